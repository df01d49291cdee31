"""The recipes that ship with Kiln, as package data (`kiln.recipes`): data/, pretrain/, sft/. `kiln recipes list`
and `kiln recipes show NAME` read them from here, so they work from a wheel as from the checkout."""
