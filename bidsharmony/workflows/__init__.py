"""Nipype workflow factories (``init_*_wf``) with ``inputnode``/``outputnode``, embeddable elsewhere."""
