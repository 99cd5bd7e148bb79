"""Evaluation metrics, each reproducing its benchmark's official scorer (tested against its documented behaviour).

- :mod:`.vqa`: VQAv2 accuracy (GT-Vision-Lab vqaEval.py), exact match, GQA accuracy (official / LLaVA / lmms-eval);
- :mod:`.choice`: option-letter extraction (MMMU, MMBench, ScienceQA rules), accuracy, MMBench CircularEval;
- :mod:`.pope`: POPE yes/no parsing, accuracy, precision, recall, F1, yes-ratio per negative sampling;
- :mod:`.grounding`: boxes parsed from model text (Qwen-VL, normalised, pixels), IoU, accuracy at IoU >= 0.5;
- :mod:`.retrieval`: recall@K both ways (CLIP_benchmark), zero-shot top-K accuracy;
- :mod:`.caption`: BLEU-1..4, METEOR, ROUGE-L, CIDEr with pycocoevalcap (the eval extra; needs Java);
- :mod:`.text`: TextVQA accuracy (mmf), ANLS (DocVQA / InfographicVQA), ChartQA's relaxed accuracy, OCRBench;
- :mod:`.mme`: MME's yes/no parsing, acc and acc+ per subtask, perception / cognition scores;
- :mod:`.mmmu`: MMMU's and MMMU-Pro's official parsing (the seeded random pick included), open answers, MMStar;
- :mod:`.mmbench`: MMBench CircularEval over the TSV's copies, SEED-Bench's letter, MME-RealWorld's extraction;
- :mod:`.hallusion`: HallusionBench's yes/no extraction, aAcc, fAcc, qAcc;
- :mod:`.stats`: percentile-bootstrap confidence intervals.

Importing this package needs neither pycocoevalcap nor Java: the caption scorers load when first used.
"""

from vlmkit.eval.metrics.caption import caption_scores, evaluate_captions
from vlmkit.eval.metrics.choice import (choice_accuracy, circular_accuracy, circular_rotations, extract_choice,
                                        score_choice)
from vlmkit.eval.metrics.hallusion import extract_yes_no, hallusion_metrics, score_hallusion
from vlmkit.eval.metrics.mmbench import (MMBENCH_COPY_STRIDE, mmbench_circular, mme_realworld_category,
                                         mme_realworld_extract, mme_realworld_summary, seedbench_choice)
from vlmkit.eval.metrics.mmmu import (DOMAIN_SUBJECTS, MMMU_SEED, MMMUScore, eval_open, mmmu_metrics, mmstar_match,
                                      parse_mmmu_choice, parse_open_response, score_mmmu)
from vlmkit.eval.metrics.mme import MME_SUBTASKS, mme_metrics, parse_mme_answer, score_mme
from vlmkit.eval.metrics.text import (anls, ocrbench_match, ocrbench_summary, relaxed_correctness, textvqa_accuracy,
                                      textvqa_normalize_answer)
from vlmkit.eval.metrics.grounding import box_iou, grounding_metrics, parse_box, score_grounding
from vlmkit.eval.metrics.pope import parse_pope_answer, pope_metrics, score_pope
from vlmkit.eval.metrics.retrieval import retrieval_metrics, zero_shot_classification_metrics
from vlmkit.eval.metrics.stats import bootstrap_ci
from vlmkit.eval.metrics.vqa import exact_match, gqa_accuracy, vqa_accuracy, vqa_aggregate, vqa_normalize_answer

__all__ = [
    "DOMAIN_SUBJECTS", "MMMU_SEED", "MMMUScore", "eval_open", "mmmu_metrics", "mmstar_match", "parse_mmmu_choice",
    "parse_open_response", "score_mmmu", "MMBENCH_COPY_STRIDE", "MME_SUBTASKS", "anls", "mmbench_circular", "mme_realworld_category",
    "mme_realworld_extract", "mme_realworld_summary", "seedbench_choice", "extract_yes_no", "hallusion_metrics", "mme_metrics", "ocrbench_match",
    "ocrbench_summary", "parse_mme_answer", "relaxed_correctness", "score_hallusion", "score_mme",
    "textvqa_accuracy", "textvqa_normalize_answer",
    "bootstrap_ci", "box_iou", "caption_scores", "choice_accuracy", "circular_accuracy", "circular_rotations",
    "evaluate_captions", "exact_match", "extract_choice", "gqa_accuracy", "grounding_metrics", "parse_box",
    "parse_pope_answer", "pope_metrics", "retrieval_metrics", "score_choice", "score_grounding", "score_pope",
    "vqa_accuracy", "vqa_aggregate", "vqa_normalize_answer", "zero_shot_classification_metrics",
]
