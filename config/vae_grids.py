# beta-VAE on your own categorical grids: any .npz ('grids' or 'imgs') or .h5 of (N, H, W) integer class ids,
# class 0 = background (e.g. ARC-style colour grids; sizes that are not a multiple of 16 are padded and masked).
# The loss is seed 002's option B (focal gamma 2 + sqrt_inverse class weights), against background collapse:
# python train_vae.py config/vae_grids.py --data=my_grids.npz
out_dir = 'out/vae_grids'
dataset_kind = 'grids'
objective = 'beta'  # seed 002's beta-VAE; --objective=factor adds FactorVAE's TC penalty
num_images = 0  # all of the file
recon_loss = 'focal'
focal_gamma = 2.0
use_class_weights = True
class_weight_method = 'sqrt_inverse'
max_epochs = 50
