"""The BiT ResNet-v2 network, its layers and CPU kernels, the registry of names and create_model."""
