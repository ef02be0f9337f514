"""Contrastive alignment: the CLIP and SigLIP losses and the training that makes the zoo's frozen encoder."""
