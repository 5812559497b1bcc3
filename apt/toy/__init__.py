"""The embedded toy demo, apart from the product path: the toy world (``world``) and its shards
(``shards``), the classifier that scores it (``classifier``, ``metrics``, ``content``), the demo's report
and bar (``report``, ``bar``), the in-training evaluation callback (``eval_callback``) and the chain
itself (``demo``, ``python -m apt demo``).

Nothing outside this package imports it unless a recipe asks for it: the ``toy-t5`` text encoder reads
the toy vocabulary, and ``eval.every_steps > 0`` adds the toy evaluation callback. Import the modules
themselves (``from apt.toy.world import eval_prompts``): this file imports nothing, so that one of them
does not pull in the others.
"""
