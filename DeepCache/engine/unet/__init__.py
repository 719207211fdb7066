"""The U-Net family: its skip-connection layout, which modules are wrapped, the U-Net and ControlNet patches."""
