"""Rebuild tests/data/entity_questions_fixture.zip from the real EntityQuestions archive.

    python tests/data/make_fixture.py /path/to/dataset.zip

The fixture keeps the archive's layout with a few relations and a few hundred questions, chosen
so that every filter has work to do: multi-answer questions in each split, and train questions
whose subject is the subject of a test question, of the same relation or of another one
(including P20, a relation that is neither in- nor out-of-distribution).
"""

import json
import sys
import zipfile
from pathlib import Path

IN_DIST = ["P17", "P36", "P495", "P26"]
OOD = ["P50", "P407"]
FILTER_ONLY = ["P20"]
N = {"train": 24, "dev": 12, "test": 8}
HERE = Path(__file__).parent


def main(archive: str) -> None:
    templates = json.loads((HERE / "fixture_templates.json").read_text())
    src = zipfile.ZipFile(archive)

    def read(rel, split):
        return json.loads(src.read(f"dataset/{split}/{rel}.{split}.json"))

    def subject(rel, q):
        return q[len(templates[rel].split("[X]")[0]) : len(q) - len(templates[rel].split("[X]")[1])]

    out = {}
    for rel in IN_DIST + OOD + FILTER_ONLY:
        test = read(rel, "test")
        multi = [q for q in test if len(q["answers"]) > 1][:1]
        out[rel, "test"] = test[: N["test"]] + multi
    all_test = {rel: read(rel, "test") for rel in IN_DIST + OOD + FILTER_ONLY}
    for rel in IN_DIST:
        train = read(rel, "train")
        plain = [q for q in train if len(q["answers"]) == 1][: N["train"]]
        multi = [q for q in train if len(q["answers"]) > 1][:2]
        # train questions whose subject occurs in some test file: add that test question too
        overlap = []
        for q in train:
            s = subject(rel, q["question"])
            for trel, tqs in all_test.items():
                hit = next((t for t in tqs if subject(trel, t["question"]) == s), None)
                if hit is not None and len(overlap) < 3:
                    overlap.append(q)
                    if hit not in out[trel, "test"]:
                        out[trel, "test"].append(hit)
                    break
            if len(overlap) >= 3:
                break
        out[rel, "train"] = plain + multi + overlap
        dev = read(rel, "dev")
        out[rel, "dev"] = [q for q in dev if len(q["answers"]) == 1][: N["dev"]] + [
            q for q in dev if len(q["answers"]) > 1
        ][:1]
    for rel in OOD + FILTER_ONLY:  # the real archive has train/dev files for every relation
        out[rel, "train"] = read(rel, "train")[:3]
        out[rel, "dev"] = read(rel, "dev")[: 12 if rel in OOD else 3]
    target = HERE / "entity_questions_fixture.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for (rel, split), qs in sorted(out.items()):
            info = zipfile.ZipInfo(
                f"dataset/{split}/{rel}.{split}.json", date_time=(2021, 9, 1, 0, 0, 0)
            )
            zf.writestr(info, json.dumps(qs, indent=1, ensure_ascii=False), zipfile.ZIP_DEFLATED)
    print(target, sum(len(v) for v in out.values()), "questions")


if __name__ == "__main__":
    main(sys.argv[1])
