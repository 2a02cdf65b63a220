"""The demo: the method's claim measured on tiny pretrained pairs, offline, on a CPU.

:mod:`vlsi.demo.run` (``vlsi demo``, ``vlsi demo pretrain``), :mod:`vlsi.demo.ablate`
(``vlsi ablate``), :mod:`vlsi.demo.recipe` (regimes and budgets), :mod:`vlsi.demo.pair` and
:mod:`vlsi.demo.pretrain` (the pretrained pairs), :mod:`vlsi.demo.pipeline` (one seed's rows),
:mod:`vlsi.demo.regime`, :mod:`vlsi.demo.noise`, :mod:`vlsi.demo.report` and
:mod:`vlsi.demo.charts` (the page).
"""
