"""Image geometry and colour shared by every stage: optical density, tile grids, stitching."""
