"""The product of a run: a strong lottery ticket, stored as seed + coded binary mask.

``save_ticket(path, meta, masks, ...)`` writes a ticket directory; ``load_ticket(path)`` reads it
back, refusing a damaged one with a one-line ``TicketError``, as a ``Ticket``: ``frozen_params()``,
``masked_params()`` (exactly ``where(mask, frozen, 0)`` on gated leaves), ``model_state()``,
``predict(images)``. No float weights are stored: they are regenerated from the seed.

One concern a module:

* ``format``: the directory's files, ``ticket.json``'s schema and versions, ``save_ticket``, ``load_ticket``;
* ``coding``: ``mask.npz``, the gates bit-packed or Golomb-coded, and ``ticket_size``;
* ``integrity``: ``mask_integrity``, the digests and counts ticket.json records, and the checks on load;
* ``regenerate``: the frozen weights from the seed (or the params file, IteRand's draws, biprop's signs);
* ``predict``: ``Ticket``, the loaded ticket;
* ``atomic_directory``: the staging directory a save writes and renames into place;
* ``destination``: what a save may replace (a ticket, an empty directory), nothing of a user's;
* ``save_checks``: the method a save records, and the mask and gate values it refuses;
* ``nnx_model``: an NNX model, drawn from the seed through the user's factory, as a ticket sees it;
* ``errors``: ``TicketError``.

A ticket loads with the models, ``slt_jax.masking`` and ``slt_jax.frozen`` only, without the
training stack.
"""
from slt_jax.ticket.coding import MASK_CODINGS, decode_masks, encode_masks, ticket_size
from slt_jax.ticket.errors import TicketError
from slt_jax.ticket.format import FORMAT_VERSION, READABLE_FORMAT_VERSIONS, load_ticket, save_ticket
from slt_jax.ticket.predict import Ticket
from slt_jax.ticket.regenerate import ZOO_INIT_KWARGS

__all__ = ["FORMAT_VERSION", "MASK_CODINGS", "READABLE_FORMAT_VERSIONS", "ZOO_INIT_KWARGS", "Ticket", "TicketError",
           "decode_masks", "encode_masks", "load_ticket", "save_ticket", "ticket_size"]
