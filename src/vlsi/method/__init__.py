"""The method itself: verbalizers, Algorithm 1's matching, the losses and the interaction loss."""
