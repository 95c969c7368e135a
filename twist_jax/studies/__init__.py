"""Studies: drivers that run the library as experiments (arms as data); the library never imports them."""
