"""The three Kandinsky 3 networks: U-Net, MoVQ autoencoder and T5 text conditioning."""
