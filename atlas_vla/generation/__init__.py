"""Demonstrations in new layouts, generated from recorded ones in the LIBERO simulator (`atlas-vla generate-demos`),
and the layouts that evaluation on unseen layouts draws (`eval-libero --layouts random`)."""
