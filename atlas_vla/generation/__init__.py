"""`atlas-vla generate-demos`: demonstrations in new layouts, re-targeted from recorded ones in the LIBERO
simulator (the layouts themselves: `atlas_vla.scenes`)."""
