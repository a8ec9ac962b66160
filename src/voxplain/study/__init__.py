"""Blinded user studies of explanation methods (paper 3, 3.4): make, serve, analyse."""
