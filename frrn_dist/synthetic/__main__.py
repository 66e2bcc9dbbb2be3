"""`python -m frrn_dist.synthetic --out DIR ...`: the CLI of frrn_dist.synthetic.dataset.

Imports: frrn_dist.synthetic.dataset.
"""

from frrn_dist.synthetic.dataset import main

main()
