//! PCI layer.
