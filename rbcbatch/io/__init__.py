"""What comes in: slide catalogs, images (whole or region by region), object storage and
de-identification of the ids they carry."""
