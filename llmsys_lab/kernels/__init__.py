from llmsys_lab._runtime import configure_triton as _configure_triton

_configure_triton()
