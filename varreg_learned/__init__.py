"""VR-Net: the varreg engine unrolled into a network with learned denoisers (needs the 'learned' extra)."""
