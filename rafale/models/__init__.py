"""rafale's models: plain nn.Modules, one file per family, and their thin Composer wrappers."""
