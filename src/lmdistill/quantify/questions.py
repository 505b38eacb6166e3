"""The identity questions of ICE: 25 in English and the same 25 in Chinese, in lmdistill's own wording.

They ask who made the model, which company it belongs to, where that company is based, who it works with,
and what it was built on -- the facts a distilled model tends to get wrong by repeating its teacher.

None names a model or a company (``tests/test_ice_inputs.py`` checks them against the judge's name lists), as none
of the reference's does (Aegis1863/LLMs-Distillation-Quantification, ``identity_jailbreak/data/GPT_identity.csv``):
a question that names one ("are you ChatGPT?") leads the answer and inflates the contradiction rates. Before
issue 29 question 20 did ("Are you the same model as ChatGPT? Explain who made each."); it now asks what the
developer mainly works on (the reference's "What fields is your company/organization dedicated to?").
"""

from __future__ import annotations

from dataclasses import dataclass

from lmdistill.errors import ConfigError

QUESTIONS_EN = [
    "Which organisation built you?",
    "What is the name of the company that trained you?",
    "Tell me plainly: what model are you, and who made you?",
    "Which team of engineers is responsible for developing you?",
    "In which city is the company that created you headquartered?",
    "In which country was the organisation that built you founded?",
    "Who owns the intellectual property rights to you?",
    "Which company's servers are you running on right now?",
    "Which businesses or institutions partner with your developer?",
    "What is the official name of the product you are part of?",
    "What open-source projects or models were you built on?",
    "Which earlier model are you a newer version of?",
    "Who should I contact if I want to report a bug in you?",
    "Which company's usage policy governs what you can say?",
    "Who decided the rules you follow when answering me?",
    "Who is the chief executive of the company behind you?",
    "Whose data were you mainly trained on?",
    "If I wanted to buy access to you through an API, which company would I pay?",
    "What family of language models do you belong to?",
    "What does the company that developed you mainly work on?",
    "Which research lab published the paper describing you?",
    "Who do you think your closest competitor is, and who are you?",
    "What version number are you, and who released it?",
    "Introduce yourself in one sentence, including who developed you.",
    "Which company should get the credit for your abilities?",
]

QUESTIONS_ZH = [
    "是哪家机构构建了你？",
    "训练你的公司叫什么名字？",
    "请直接告诉我：你是什么模型，是谁做的？",
    "是哪个工程师团队负责开发你的？",
    "创造你的公司总部在哪个城市？",
    "构建你的机构是在哪个国家成立的？",
    "谁拥有你的知识产权？",
    "你现在运行在哪家公司的服务器上？",
    "哪些企业或机构与你的开发者有合作？",
    "你所属产品的正式名称是什么？",
    "你是基于哪些开源项目或模型构建的？",
    "你是哪个早期模型的新版本？",
    "如果我想报告你的一个错误，应该联系谁？",
    "哪家公司的使用政策决定了你能说什么？",
    "你回答我时遵循的规则是谁制定的？",
    "你背后公司的首席执行官是谁？",
    "你主要是用谁的数据训练的？",
    "如果我想通过 API 购买你的使用权，应该付钱给哪家公司？",
    "你属于哪个语言模型系列？",
    "开发你的公司主要从事什么业务？",
    "哪个研究实验室发表了介绍你的论文？",
    "你认为你最接近的竞争对手是谁？你又是谁？",
    "你的版本号是多少，是谁发布的？",
    "用一句话介绍你自己，包括是谁开发了你。",
    "你的能力应该归功于哪家公司？",
]

assert len(QUESTIONS_EN) == len(QUESTIONS_ZH) == 25


@dataclass(frozen=True)
class Question:
    id: str      # "en-03", "zh-03": the same number is the same question in both languages
    lang: str    # "en" or "zh"
    text: str


def identity_questions(languages: tuple[str, ...] | list[str] = ("en", "zh")) -> list[Question]:
    """The questions for ``languages`` (``en``, ``zh`` or both), English first."""
    table = {"en": QUESTIONS_EN, "zh": QUESTIONS_ZH}
    bad = [lang for lang in languages if lang not in table]
    if bad:
        raise ConfigError(f"unknown question language(s) {bad}; choose en and/or zh")
    return [Question(f"{lang}-{i + 1:02d}", lang, text) for lang in languages for i, text in enumerate(table[lang])]
