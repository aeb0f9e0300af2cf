"""FedSpa on Flower (``flwr``): a server strategy and a client app exchanging fedspa's sparse payloads.

    fedspa.flower.strategy.FedSpaStrategy   the server: sparse downlinks, checked sparse uploads, scatter-add
    fedspa.flower.client_app.app            the ClientApp (one FedSpa client per SuperNode)
    fedspa.flower.server_app.app            the ServerApp (runs the strategy, writes metrics like fedspa.train)

The Flower app folder is ``flower/`` at the repository root (``flwr run flower <connection>``); see the README.
"""
