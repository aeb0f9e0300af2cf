"""fedspa's algorithms on Flower (``flwr``): a server strategy and a client app exchanging fedspa's payloads.

    fedspa.flower.strategy.FederatedStrategy  the server half of any registered algorithm (FedSpa: sparse
                                              downlinks, checked sparse uploads, scatter-add)
    fedspa.flower.client_app.app              the ClientApp (one client half per SuperNode, its partition only)
    fedspa.flower.server_app.app              the ServerApp (runs the strategy, writes metrics like fedspa.train)

The Flower app folder is ``flower/`` at the repository root (``flwr run flower <connection>``); see the README.
"""
