"""Pure loss functions of arrays, and the terms a method declares from them."""
