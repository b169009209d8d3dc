"""BibTeX of the papers whose methods tailorkit implements.

Kept apart from the methods' code (which needs torch) because every model card cites
them, and a build that only cuts or copies layers writes its card without importing torch.
"""

GPTAILOR = """@article{su2025gptailor,
  title   = {{GPTailor}: Large Language Model Pruning Through Layer Cutting and Stitching},
  author  = {Su, Guinan and Shen, Li and Yin, Lu and Liu, Shiwei and Yang, Yanwu
             and Geiping, Jonas},
  journal = {arXiv preprint arXiv:2506.20480},
  year    = {2025}
}"""

SLM = """@article{ding2025slm,
  title   = {A Sliding Layer Merging Method for Efficient Depth-Wise Pruning in {LLMs}},
  author  = {Ding, Xuan and Sun, Rui and Zhang, Yunjian and Yan, Xiu and Zhou, Yueqi
             and Huang, Kaihao and Fu, Suzhong and Xie, Chuanlong and Zhu, Yao},
  journal = {arXiv preprint arXiv:2502.19159},
  year    = {2025}
}"""

SHORTGPT = """@article{men2024shortgpt,
  title   = {{ShortGPT}: Layers in Large Language Models are More Redundant Than You Expect},
  author  = {Men, Xin and Xu, Mingyu and Zhang, Qingyu and Wang, Bingning and Lin, Hongyu
             and Lu, Yaojie and Han, Xianpei and Chen, Weipeng},
  journal = {arXiv preprint arXiv:2403.03853},
  year    = {2024}
}"""

ANGULAR = """@article{gromov2024unreasonable,
  title   = {The Unreasonable Ineffectiveness of the Deeper Layers},
  author  = {Gromov, Andrey and Tirumala, Kushal and Shapourian, Hassan and Glorioso, Paolo
             and Roberts, Daniel A.},
  journal = {arXiv preprint arXiv:2403.17887},
  year    = {2024}
}"""

LACO = """@article{yang2024laco,
  title   = {{LaCo}: Large Language Model Pruning via Layer Collapse},
  author  = {Yang, Yifei and Cao, Zouying and Zhao, Hai},
  journal = {arXiv preprint arXiv:2402.11187},
  year    = {2024}
}"""

REPLACEME = """@inproceedings{shopkhoev2025replaceme,
  title     = {{ReplaceMe}: Network Simplification via Depth Pruning and Transformer Block
               Linearization},
  author    = {Shopkhoev, Dmitriy and Ali, Ammar and Zhussip, Magauiya and Malykh, Valentin
               and Lefkimmiatis, Stamatios and Komodakis, Nikos and Zagoruyko, Sergey},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2025},
  note      = {arXiv:2505.02819}
}"""
