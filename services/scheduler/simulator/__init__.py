"""The XSimulator: what a schedule delivers (`predict`), one module per kind of schedule."""
