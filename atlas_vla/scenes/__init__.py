"""LIBERO scenes as objects on a table: their poses, new layouts of them, and instructions that name an object
where it is; used by generate-demos (`atlas_vla.generation`) and by evaluation on unseen layouts."""
