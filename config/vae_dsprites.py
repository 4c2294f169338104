# beta-VAE on the real dSprites file (737,280 images, 5 factors; download it yourself), the literature's recipe:
# beta 4, Adam 1e-4, batch 64, ~300k steps (26 epochs). Meant for a GPU (~10 h on one CPU thread); the file is
# decompressed into memory (3 GB of uint8).
# python train_vae.py config/vae_dsprites.py --data=dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz
# FactorVAE as Kim & Mnih ran it: add --objective=factor --beta=1 --disc_hidden=1000 --disc_learning_rate=1e-4
out_dir = 'out/vae_dsprites'
num_images = 0  # all of the file
objective = 'beta'  # the beta-VAE recipe (the built-in default is FactorVAE, --objective=factor)
beta = 4.0
learning_rate = 1e-4
batch_size = 64
max_epochs = 26
val_fraction = 0.01
