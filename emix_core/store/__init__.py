"""Storage: the metadata database and blob stores."""
