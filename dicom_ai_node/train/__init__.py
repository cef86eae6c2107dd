"""train: training and evaluation of model packages from image folders or .npz files."""
