"""Generation policies: one module each, one interface ``run(student, teacher, batch) -> Decoded``."""

from lmdistill.generation.policies import mixed, scrg, student, switch, teacher, teacher_mix

POLICIES = {
    "student": student.run,
    "teacher": teacher.run,
    "mixed": mixed.run,
    "switch": switch.run,
    "scrg": scrg.run,
    "teacher_mix": teacher_mix.run,
}

#: policies that always need a teacher (``mixed`` needs one only for rows without gold).
NEEDS_TEACHER = ("teacher", "switch", "scrg", "teacher_mix")

#: policies that can use a teacher that only scores whole sequences (a served teacher: ``scrg.scores_sequences``);
#: the others need the teacher's own tokens or distribution at every generated token.
SCORES_SEQUENCES = ("scrg",)

__all__ = ["NEEDS_TEACHER", "POLICIES", "SCORES_SEQUENCES"]
