"""One module per method; each is a LightningModule subclass of `CLIPMethod` plus its parameter selection."""
