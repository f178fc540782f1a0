"""Berth's data plane: the inference engine, the model server and the node agent."""
