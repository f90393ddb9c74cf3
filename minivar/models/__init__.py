"""Model families: configs, vision towers, decoders and the LMMs that join them (one file per component)."""
