"""``megatron-simreg compare``: a grid of runs (:mod:`.grid`), trained (:mod:`.runner`), evaluated
(:mod:`.evaluate`), aggregated over seeds (:mod:`.summary`) and reported (:mod:`.report`)."""
