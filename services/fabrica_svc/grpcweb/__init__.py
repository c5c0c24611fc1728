"""The gRPC-Web gateway (`fabrica grpc-web`, started by `fabrica run`): the browser's way in. See app.py."""
