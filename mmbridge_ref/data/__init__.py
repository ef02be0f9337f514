"""ShapesWorld, data mixing and the sample formats every recipe reads."""
