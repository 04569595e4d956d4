"""Readers of the containers a checkpoint comes in, shared by the static scan and the host's
verification (host side; standard library only; nothing here runs or imports what a file names).

Each module reads one container by its bytes and has a small public surface:

* :mod:`.buffer`: the memory-mapped file every reader works on, and little-endian integers;
* :mod:`.zip_archive`: the central directory as readers that start from the end see it,
  local headers, member inflation within a cap, and what torch's reader would unpickle;
* :mod:`.tar_archive`: the member headers of torch's oldest (tar) format;
* :mod:`.npy`: ``.npy`` headers and numpy dtype strings;
* :mod:`.safetensors_header`: the JSON header of a SafeTensors file, checked;
* :mod:`.compressed`: the stdlib compressions joblib and others wrap a pickle in;
* :mod:`.pickle_ops`: the one pickle opcode decoder (bounds, FRAME, memo arguments, every
  opcode's argument), which the static walker and the host's reconstruction both drive.

Errors: a container that cannot be read raises :class:`~sandbox.errors.MalformedInput`; the
opcode decoder raises :class:`.pickle_ops.Truncated` or :class:`.pickle_ops.Invalid`, which
each interpreter turns into its own outcome.
"""
