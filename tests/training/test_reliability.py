"""Reliability: no upload, file or setting crashes a run, corrupts it, or runs code. Each test names the attack.

Uploads go through the server's ``receive`` (what simulation and Flower both call) or a whole simulated round;
payloads are crafted with ``comm.encode_entries``, which writes entries exactly as given.
"""

from __future__ import annotations

import json
import math
import struct
import time
import tracemalloc

import pytest
import torch
import yaml

from fedspa import comm
from fedspa.algorithms.base import TrainMetrics, Upload
from fedspa.cli import main
from fedspa.config import ExperimentConfig
from fedspa.train import CheckpointError, RunExistsError, federation, read_checkpoint, run

TINY = ["data.dataset=digits", "data.samples_per_client=120", "clients=3", "client_fraction=1.0", "model.name=mlp",
        "model.width=4", "rounds=2", "local_steps=2", "batch_size=20", "fedspa.density=0.3", "measure_memory=false",
        "progress=false"]
METRICS = TrainMetrics(loss=1.0, samples=10, flops=1.0, peak_memory=None)


def _config(*extra: str) -> ExperimentConfig:
    return ExperimentConfig.load(None, TINY + list(extra))


@pytest.fixture(scope="module")
def fed():
    """A FedSpa federation, and one honest upload of client 0 (decoded entries to mutate)."""
    federation_ = federation(_config())
    payload, _ = federation_.clients[0].round(federation_.server.downlink(0, 0), 0)
    return federation_, payload


def _receive(fed_, payload: bytes, client: int = 0):
    federation_, _ = fed_
    return federation_.server.receive(Upload(client, payload, METRICS, 0, 0))


def _server_state(federation_) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in
            _flat(federation_.server.state_dict()).items()}


def _flat(state, prefix=""):
    out = {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else None
    if items is None:
        return {prefix: state}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


# ------------------------------------------------------------------------------------------------------------------
# Uploads: the five ways one client crashed the server, and the amplification attacks
# ------------------------------------------------------------------------------------------------------------------
def test_a_six_byte_payload_is_refused_not_a_struct_error(fed):
    with pytest.raises(ValueError, match="truncated payload"):
        _receive(fed, b"FSP1\x01\x00")
    for prefix in (b"", b"F", b"FSP1", b"FSP1\x01\x00\x00"):
        with pytest.raises(ValueError):
            _receive(fed, prefix)


def test_positions_that_wrap_around_int32_are_refused(fed):
    """A large position followed by -2**31: a difference taken in int32 wraps to positive; comparisons do not."""
    _, payload = fed
    entries = comm.decode(payload)
    first = next(i for i, e in enumerate(entries) if e.positions is not None)
    e = entries[first]
    positions = e.positions.clone()
    positions[-2:] = torch.tensor([e.numel - 1, -2**31])
    entries[first] = comm.Entry(comm.INDICES, e.numel, positions, e.values)
    with pytest.raises(ValueError, match="strictly increasing"):
        _receive(fed, comm.encode_entries(entries))


def test_a_dense_entry_with_fewer_values_than_elements_is_refused(fed):
    _, payload = fed
    entries = comm.decode(payload)
    dense = next(i for i, e in enumerate(entries) if e.kind == comm.DENSE)
    e = entries[dense]
    entries[dense] = comm.Entry(comm.DENSE, e.numel, None, e.values[:-1])
    with pytest.raises(ValueError, match=f"dense with {e.numel - 1} values for {e.numel} elements"):
        _receive(fed, comm.encode_entries(entries))


def test_train_metrics_without_flops_drop_the_client_and_the_round_completes(tmp_path, monkeypatch):
    """In simulation as in Flower, the metrics cross as a record and are checked; peak_memory is optional."""
    monkeypatch.setattr(TrainMetrics, "to_record", _record_without("flops"))
    result = run(_config("rounds=1"), output_dir=tmp_path)
    dropped = result.history[0]["dropped"]
    assert set(dropped) == {"0", "1", "2"} and all("'flops' is missing" in why for why in dropped.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["dropped"]["1"]) == {"0", "1", "2"}


def test_train_metrics_without_peak_memory_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainMetrics, "to_record", _record_without("peak_memory"))
    result = run(_config("rounds=1", "measure_memory=true"), output_dir=tmp_path)
    assert "dropped" not in result.history[0] and result.history[0]["peak_memory"] is None


def _record_without(key):
    original = TrainMetrics.to_record

    def to_record(self):
        return {k: v for k, v in original(self).items() if k != key}
    return to_record


def test_an_all_ones_bitmap_is_refused_before_anything_is_allocated(fed):
    """A bitmap naming every position of the largest tensor (a 65x expansion once decoded) for a client whose mask
    holds 30% of it: the header's count is checked against the server's expectation first."""
    federation_, payload = fed
    server = federation_.server
    name = max(server.mask_shapes, key=lambda n: math.prod(server.mask_shapes[n]))
    entries = comm.decode(payload)
    index = server.wire_names.index(name)
    numel = entries[index].numel
    entries[index] = comm.Entry(comm.BITMAP, numel, torch.arange(numel), torch.ones(numel))
    crafted = comm.encode_entries(entries)
    tracemalloc.start()
    began = time.perf_counter()
    with pytest.raises(ValueError, match=f"tensor {index} has {numel} values, expected"):
        _receive(fed, crafted)
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024 and seconds < 0.05, (peak, seconds)


def test_a_megabyte_of_empty_headers_is_refused_in_constant_memory(fed):
    crafted = struct.pack("<4sI", comm.MAGIC, 2**20 // 13) + struct.pack("<HBII", 0, comm.DENSE, 0, 0) * (2**20 // 13)
    for expect in (True, False):
        tracemalloc.start()
        began = time.perf_counter()
        with pytest.raises(ValueError):
            if expect:
                _receive(fed, crafted)
            else:  # no expectation: ids must count up, so the second header already fails
                comm.decode(crafted)
        seconds = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * 1024 and seconds < 0.05, (expect, peak, seconds)


def test_a_bitmap_whose_popcount_differs_from_its_count_is_refused(fed):
    _, payload = fed
    entries = comm.decode(payload)
    i = next(i for i, e in enumerate(entries) if e.positions is not None)
    e = entries[i]
    crafted = bytearray(comm.encode_entries([comm.Entry(comm.BITMAP, e.numel, e.positions, e.values)]))
    crafted[8 + 11] ^= 0xFF  # flip the first byte of the bitmap: the set bits no longer match the count
    with pytest.raises(ValueError, match="the bitmap marks"):
        comm.decode(bytes(crafted))


def test_a_bitmap_with_bits_past_its_end_is_refused():
    entry = comm.Entry(comm.BITMAP, 10, torch.tensor([1, 3]), torch.ones(2))
    crafted = bytearray(comm.encode_entries([entry]))
    crafted[8 + 11 + 1] |= 0x01  # bit 15 of a 10-element tensor
    with pytest.raises(ValueError, match="past its 10 elements"):
        comm.decode(bytes(crafted))


def test_a_non_finite_value_in_any_entry_is_refused(fed):
    _, payload = fed
    for index in range(len(comm.decode(payload))):
        entries = comm.decode(payload)
        values = entries[index].values.clone()
        values[len(values) // 2] = float("inf")
        entries[index] = comm.Entry(entries[index].kind, entries[index].numel, entries[index].positions, values)
        with pytest.raises(ValueError, match=f"tensor {index} has a non-finite value"):
            _receive(fed, comm.encode_entries(entries))


def test_an_upload_for_a_client_outside_the_federation_is_refused(fed):
    _, payload = fed
    for client in (-1, 3, 10**9):
        with pytest.raises(ValueError, match="not part of this federation"):
            _receive(fed, payload, client)


def test_a_refused_upload_leaves_the_server_state_unchanged_and_the_round_completes(tmp_path, monkeypatch):
    """Client 1 sends garbage in every round: it is dropped with the reason (history and summary.json); the others
    are aggregated; the run finishes with finite weights."""
    from fedspa.algorithms.fedspa import FedSpaClient

    honest = FedSpaClient.round

    def garbage_for_client_1(self, downlink, round_index, measure_memory=False):
        payload, metrics = honest(self, downlink, round_index, measure_memory=measure_memory)
        return (payload[: len(payload) - 7] if self.client_id == 1 else payload), metrics

    monkeypatch.setattr(FedSpaClient, "round", garbage_for_client_1)
    result = run(_config(), output_dir=tmp_path)
    for row in result.history:
        assert set(row["dropped"]) == {"1"} and "truncated payload" in row["dropped"]["1"]
        assert row["sampled"] == [0, 1, 2] and math.isfinite(row["train_loss"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["dropped"]) == ["1", "2"]
    state = read_checkpoint(tmp_path / "checkpoint.pt")["server"]
    assert all(torch.isfinite(v).all() for v in state["global"].values() if v.dtype.is_floating_point)
    assert state["server_knows_mask"][1] is False  # the mask it never delivered is sent again


# ------------------------------------------------------------------------------------------------------------------
# Fuzzing the decoder and the server's upload path
# ------------------------------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _mutate(payload: bytes, edits: list[tuple[int, int]], cut: int | None, tail: bytes) -> bytes:
    data = bytearray(payload)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    return bytes(data) + tail


MUTATIONS = dict(edits=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
                 cut=st.none() | st.integers(0, 2**20), tail=st.binary(max_size=16))


def _bounded(call, payload: bytes, limit: int) -> None:
    """`call()` raises nothing but ValueError, and allocates (numpy, Python) less than `limit` bytes."""
    tracemalloc.start()
    try:
        call()
    except ValueError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit, (peak, len(payload))


@FUZZ
@given(payload=st.binary(max_size=512))
def test_fuzz_random_bytes_give_only_value_errors(payload):
    _bounded(lambda: comm.decode(payload), payload, 64 * 1024 + 16 * len(payload))


@FUZZ
@given(**MUTATIONS)
def test_fuzz_mutated_uploads_give_only_value_errors_in_bounded_memory(fed, edits, cut, tail):
    """Without an expectation decoding allocates a small multiple of the payload; the server's own path (with its
    expectation) at most what the model's tensors legitimately need, and leaves its state untouched."""
    federation_, payload = fed
    crafted = _mutate(payload, edits, cut, tail)
    _bounded(lambda: comm.decode(crafted), crafted, 64 * 1024 + 16 * len(crafted))
    model_bytes = sum(9 * math.prod(s) for s in federation_.server.models.shapes.values())  # bool + int64 per element
    before = _server_state(federation_)
    _bounded(lambda: _receive(fed, crafted), crafted, 64 * 1024 + 2 * model_bytes + 4 * len(crafted))
    assert _same(before, _server_state(federation_))


@FUZZ
@given(record=st.dictionaries(st.sampled_from(["loss", "samples", "flops", "peak_memory", "profiling_seconds",
                                               "extra.x", "correct", "total"]),
                              st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4)
                              | st.binary(max_size=4), max_size=8))
def test_fuzz_metric_records_give_only_value_errors(record):
    from fedspa.algorithms.base import EvalMetrics

    for kind in (TrainMetrics, EvalMetrics):
        try:
            parsed = kind.from_record(record)
        except ValueError:
            continue
        values = {k: v for k, v in vars(parsed).items() if isinstance(v, (int, float))}
        if kind is EvalMetrics and "loss" not in record:
            assert math.isnan(values.pop("loss"))  # an evaluation may leave its loss out
            assert 0 <= parsed.correct <= parsed.total
        assert all(math.isfinite(v) for v in values.values()), values


# ------------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["lr=.nan", "momentum=.inf", "weight_decay=-.inf", "grad_clip=.nan",
                                      "data.alpha=.nan", "ditto.lambda=.inf", "fedprox.mu=.nan", "lr_decay=.nan",
                                      "fedspa.density=.nan"])
def test_a_non_finite_setting_is_a_clean_error(override, capsys):
    field = override.split("=")[0]
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        _config(override)
    assert main(["train", "algorithm=fedavg", override]) == 2
    assert f"{field} must be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "message"), [
    ("threads=-1", "threads must be an integer >= 1"), ("threads=0", "threads must be an integer >= 1"),
    ("seed=4294967296", r"seed must lie in \[0, 2\*\*32\)"), ("seed=-1", r"seed must lie in \[0, 2\*\*32\)"),
    ("data.seed=99999999999999999999", r"data.seed must lie in"), ("rounds=99999999999", "rounds must lie in"),
    ("local_steps=0", "local_steps must be >= 1"),
])
def test_an_out_of_range_number_is_a_clean_error(override, message, capsys):
    with pytest.raises(ValueError, match=message):
        _config(override)
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_largest_seed_runs(tmp_path):
    assert run(_config("rounds=1", f"seed={2**32 - 1}", f"data.seed={2**32 - 1}"), output_dir=tmp_path).history


@pytest.mark.parametrize(("text", "message"), [
    ("rounds: [1,\n", "is not valid YAML"),
    ("!!python/object/apply:os.system ['touch /tmp/fedspa-yaml-ran']\n", "is not valid YAML"),
    ("rounds: !!python/object/apply:os.system ['touch /tmp/fedspa-yaml-ran']\n", "is not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("1: 2\n", "keys must be strings"),
    (("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
      "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
      "rounds: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"), "unknown config key"),  # an alias bomb: never expanded
])
def test_a_bad_config_file_is_one_clean_line(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.load(path)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message.split()[-1] in err and err.count("\n") == 1 and "Traceback" not in err
    import os
    assert not os.path.exists("/tmp/fedspa-yaml-ran")


def test_bad_json_and_bad_override_yaml_are_clean_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"rounds": 3,')
    with pytest.raises(ValueError, match="is not valid JSON"):
        ExperimentConfig.load(path)
    with pytest.raises(ValueError, match="the value is not valid YAML"):
        ExperimentConfig.load(None, ["rounds=[1,"])
    with pytest.raises(ValueError, match="the value is not valid YAML"):
        ExperimentConfig.load(None, ["rounds=!!python/name:os.system"])
    assert yaml.safe_dump(_config().to_dict())  # the saved config stays plain YAML


# ------------------------------------------------------------------------------------------------------------------
# Run folders
# ------------------------------------------------------------------------------------------------------------------
def test_an_existing_run_is_not_overwritten_without_asking(tmp_path, capsys):
    out = tmp_path / "run"
    first = run(_config(), output_dir=out)
    checkpoint = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(RunExistsError, match="already holds a run"):
        run(_config("lr=0.01"), output_dir=out)
    assert main(["train", "--output", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == checkpoint  # untouched
    (out / "notes.txt").write_text("mine")
    replaced = run(_config("lr=0.01"), output_dir=out, overwrite=True)
    assert replaced.history[0]["train_loss"] != first.history[0]["train_loss"]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are removed
    assert main(["train", "--output", str(out), "--overwrite", *TINY]) == 0


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run(_config(), output_dir=tmp_path, resume=True)
    assert main(["train", "--output", str(tmp_path), "--resume", *TINY]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_without_output_is_an_error(capsys):
    with pytest.raises(ValueError, match="resume needs the output folder"):
        run(_config(), resume=True)
    assert main(["train", "--resume", *TINY]) == 2
    assert "--resume needs --output" in capsys.readouterr().err


def test_resume_and_overwrite_together_are_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="exclude each other"):
        run(_config(), output_dir=tmp_path, resume=True, overwrite=True)
    with pytest.raises(SystemExit):
        main(["train", "--output", str(tmp_path), "--resume", "--overwrite", *TINY])


@pytest.mark.parametrize("name", ["/../../../x", "../x", "a/b", ".hidden", "", "x" * 101, "a b", "ü"])
def test_a_run_name_cannot_escape_output_dir(name, tmp_path):
    with pytest.raises(ValueError, match="name must be 1-100 letters"):
        _config(f"name={json.dumps(name)}", f"output_dir={tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_output_naming_a_file_is_a_clean_error(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run(_config(), output_dir=target)
    assert main(["train", "--output", str(target), *TINY]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["flower", "simulate", "--output", str(target), *TINY]) == 2


def test_a_finished_run_can_be_extended_with_more_rounds(tmp_path):
    """rounds=2, then --resume rounds=3: round 3 is added; rounds 1-2 are kept as they were."""
    out = tmp_path / "run"
    short = run(_config(), output_dir=out)
    longer = run(_config("rounds=3"), output_dir=out, resume=True)
    assert [h["round"] for h in longer.history] == [1, 2, 3]
    assert longer.history[:2] == short.history
    assert ExperimentConfig.load(out / "config.yaml").rounds == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(CheckpointError, match="has 3 rounds done; this run has rounds=2"):
        run(_config(), output_dir=out, resume=True)
    with pytest.raises(CheckpointError, match="different experiment"):
        run(_config("rounds=4", "lr=0.01"), output_dir=out, resume=True)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    run(_config(), output_dir=out)
    return out, read_checkpoint(out / "checkpoint.pt")


def _set(state: dict, path: str, value) -> None:
    node = state
    parts = path.split("/")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()


def _malformed_cases(state: dict) -> list[tuple[str, object, str]]:
    mask_name = next(iter(state["server"]["masks"][0]))
    mask = state["server"]["masks"][0][mask_name]
    weight = state["server"]["global"][mask_name]
    personal_mask = next(k for k in state["clients"][0] if k.startswith("mask."))
    return [
        ("server", _DELETE, "lacks the field 'server'"),
        ("server/global", _DELETE, "server state must hold"),
        ("server/global/" + mask_name, weight[:1], f"global {mask_name} must be a tensor of shape"),
        ("server/global/" + mask_name, torch.full_like(weight, float("nan")), "holds a non-finite value"),
        ("server/masks/0/" + mask_name, mask.float(), "must be torch.bool"),
        ("server/masks/0/" + mask_name, torch.zeros_like(mask), "has 0 active weights"),
        ("server/masks/0/" + mask_name, torch.ones_like(mask), f"has {mask.numel()} active weights"),
        ("server/masks", state["server"]["masks"][:1], "masks must be a list of 3 entries"),
        ("server/server_knows_mask", [1, 0, 1], "must hold booleans"),
        ("clients", state["clients"][:2], "holds 2 clients, the run has 3"),
        ("clients/0/" + personal_mask, torch.zeros_like(state["clients"][0][personal_mask]),
         "client 0's state is malformed.*has 0 active weights"),
        ("clients/1", {"bogus": torch.zeros(1)}, "client 1's state is malformed"),
        ("clients/2", [1, 2], "client 2's state is malformed"),
        ("round", 10**9, "has 1000000000 rounds done; this run has rounds=2"),
        ("round", -1, "has round -1"),
        ("round", "2", "round must be a int"),
        ("round", 1, "1 rounds done but 2 history rows"),
        ("history", "rows", "history must be a list"),
        ("history/1", {"round": 2, "bytes_up": float("nan")}, "needs a finite number bytes_up"),
        ("history/0", {"round": 7}, "history row 0 must be a dict for round 1"),
        ("config", [], "config must be a dict"),
        ("config/rounds", {"nested": 1}, "config is malformed|different experiment"),
        ("setup", {"model": "x"}, "written with another model"),
    ]


@pytest.mark.parametrize("case", range(23))
def test_a_malformed_checkpoint_is_a_checkpoint_error_naming_it(finished, case, tmp_path):
    import copy

    source, state = finished
    cases = _malformed_cases(state)
    assert len(cases) == 23
    path, value, message = cases[case]
    broken = copy.deepcopy(state)
    _set(broken, path, value)
    out = tmp_path / "run"
    out.mkdir()
    torch.save(broken, out / "checkpoint.pt")
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        (out / name).write_bytes((source / name).read_bytes())
    with pytest.raises(CheckpointError, match=message):
        run(_config("rounds=2"), output_dir=out, resume=True)


def test_the_checkpoint_is_fsynced_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    import os

    from fedspa import train

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(train.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(train.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    run(_config("rounds=1"), output_dir=tmp_path)
    assert events[:3] == ["fsync", "replace", "fsync"]  # the file, the rename, the folder
    assert not (tmp_path / "checkpoint.tmp").exists()
