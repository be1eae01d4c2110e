"""Networks of the ExEM CycleGAN: anisotropic 3D U-Net generator, multi-scale PatchGAN discriminator."""

from exem.models.discriminator import MultiScaleDiscriminator3D
from exem.models.unet import AnisotropicUNet3D, group_count

__all__ = ["AnisotropicUNet3D", "MultiScaleDiscriminator3D", "group_count"]
