"""spectral-merge: merging fine-tuned networks with the help of their weight spectra.

Modules
-------
paths      where data, caches, results and figures live (overridable by environment variables)
device     the one place that picks cuda -> mps -> cpu
statedict  state-dict checks shared by every routine (keys, shapes, NaN/Inf, which tensors are matrices)
spectral   Marchenko-Pastur law, eigenvalue spectra, SNR, scan(model)
merge      merge(method, base, experts, **hp) and the METHODS registry
data       datasets: local copies first, the public hub otherwise
models     MiniLM text classifier, ResNet-18 for 28x28 input
train      fit / evaluate / cache experts
plotting   one savefig(), one style
"""

__version__ = "0.1.0"
