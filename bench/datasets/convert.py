"""Converters for the public datasets behind the general zero-shot adapter (``SOURCES.md``).

Each converter reads one public GitHub repository at a pinned commit (a clone or a bare git
directory: ``git -C <repo> show <commit>:<path>``) and writes the repository's normalised form
(``docs.jsonl`` with ``{"id", "text", "labels", "split"}`` and ``labels.json`` with one
natural-language description per label) under ``--out/<name>/``. Only these converters and the
label descriptions are kept in this repository, never the data.

Usage::

    git clone https://github.com/xliuhw/NLU-Evaluation-Data /tmp/hwu64
    python bench/datasets/convert.py hwu64 --repo /tmp/hwu64 --out runs/datasets
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: HWU64 (Liu et al., IWSDS 2019): 64 home-assistant intents, ``scenario_intent``.
HWU64_DESCRIPTIONS: dict[str, str] = {
    "alarm_query": "ask which alarms are set",
    "alarm_remove": "remove or cancel an alarm",
    "alarm_set": "set an alarm or wake-up call",
    "audio_volume_down": "turn the volume down",
    "audio_volume_mute": "mute the sound or be quiet",
    "audio_volume_up": "turn the volume up",
    "calendar_query": "ask about events or meetings in the calendar",
    "calendar_remove": "delete an event or meeting from the calendar",
    "calendar_set": "add an event, meeting or reminder to the calendar",
    "cooking_recipe": "ask for a recipe or how to cook something",
    "datetime_convert": "convert a time between time zones",
    "datetime_query": "ask for the current time or date",
    "email_addcontact": "add an email address to the contacts",
    "email_query": "check or read new emails",
    "email_querycontact": "ask for a contact's details",
    "email_sendemail": "send or reply to an email",
    "general_affirm": "say yes or affirm",
    "general_commandstop": "tell the assistant to stop",
    "general_confirm": "confirm that something was done or understood",
    "general_dontcare": "say it does not matter or you do not care",
    "general_explain": "ask the assistant to explain or repeat what it meant",
    "general_joke": "ask for a joke",
    "general_negate": "say no or negate",
    "general_praise": "praise or thank the assistant",
    "general_quirky": "chit-chat or an odd remark to the assistant",
    "general_repeat": "ask the assistant to say that again",
    "iot_cleaning": "start the robot vacuum cleaner",
    "iot_coffee": "make a cup of coffee with the coffee machine",
    "iot_hue_lightchange": "change the colour of the lights",
    "iot_hue_lightdim": "dim the lights",
    "iot_hue_lightoff": "turn the lights off",
    "iot_hue_lighton": "turn the lights on",
    "iot_hue_lightup": "make the lights brighter",
    "iot_wemo_off": "turn off a smart plug or socket",
    "iot_wemo_on": "turn on a smart plug or socket",
    "lists_createoradd": "create a list or add an item to a list",
    "lists_query": "ask what is on a list",
    "lists_remove": "remove an item from a list or delete a list",
    "music_likeness": "say which music you like",
    "music_query": "ask which song or artist is playing",
    "music_settings": "change music settings such as shuffle or repeat",
    "news_query": "ask for the news",
    "play_audiobook": "play or resume an audiobook",
    "play_game": "play a game",
    "play_music": "play a song, artist or music",
    "play_podcasts": "play a podcast",
    "play_radio": "play a radio station",
    "qa_currency": "ask for a currency exchange rate",
    "qa_definition": "ask for the definition or meaning of a word",
    "qa_factoid": "ask a factual question about the world",
    "qa_maths": "ask to calculate a maths problem",
    "qa_stock": "ask for a stock price",
    "recommendation_events": "ask for events happening nearby",
    "recommendation_locations": "ask for a recommended place such as a restaurant or shop",
    "recommendation_movies": "ask for a movie recommendation",
    "social_post": "post on social media or complain to a company",
    "social_query": "ask what is new on social media",
    "takeaway_order": "order a takeaway or food delivery",
    "takeaway_query": "ask about a takeaway order or delivery",
    "transport_query": "ask about train or travel times",
    "transport_taxi": "book a taxi",
    "transport_ticket": "book a train or travel ticket",
    "transport_traffic": "ask about the traffic on the road",
    "weather_query": "ask about the weather",
}

#: SNIPS NLU benchmark (Coucke et al., 2018), 2017-06 custom intents.
SNIPS_DESCRIPTIONS: dict[str, str] = {
    "AddToPlaylist": "add a song or artist to a playlist",
    "BookRestaurant": "book a table at a restaurant",
    "GetWeather": "ask for the weather forecast",
    "PlayMusic": "play music, a song or an album",
    "RateBook": "give a book a rating",
    "SearchCreativeWork": "find a book, song, film, game or TV show",
    "SearchScreeningEvent": "find movie showtimes or a cinema",
}

#: News Category Dataset (Misra, 2022): HuffPost headlines and short descriptions, one section each.
#: Sections with fewer than 40 articles in the excerpt (TRAVEL, EDUCATION, LATINO VOICES, WEDDINGS)
#: are left out.
NEWS_DESCRIPTIONS: dict[str, str] = {
    "POLITICS": ("News about politics and government, such as elections, Congress, the White House, parties "
                 "and political campaigns."),
    "ENTERTAINMENT": ("News about entertainment and celebrities, such as films, television, music, awards "
                      "and famous people."),
    "U.S. NEWS": ("News about events across the United States, such as accidents, disasters, courts, "
                  "schools and local communities."),
    "WORLD NEWS": ("News about other countries and international affairs, such as wars, diplomacy, foreign "
                   "governments and disasters abroad."),
    "COMEDY": "Comedy and satire: jokes, late-night television hosts and comedians making fun of the news.",
    "SPORTS": "News about sports, such as games, teams, athletes, leagues and championships.",
    "CRIME": ("News about crime, such as shootings, murders, arrests, police investigations and criminal "
              "trials."),
    "STYLE & BEAUTY": "Stories about fashion, clothes, beauty products, makeup and style.",
    "MEDIA": ("News about the news media and journalism, such as TV networks, newspapers, reporters and "
              "press freedom."),
    "WEIRD NEWS": "Odd and unusual news: strange, bizarre or funny things that happened.",
    "BLACK VOICES": "News and stories about Black people and communities, racism and Black culture.",
    "HOME & LIVING": "Stories about home life, such as houses, decorating, cleaning, gardening and pets.",
    "ENVIRONMENT": ("News about the environment, such as climate change, pollution, wildlife, weather and "
                    "energy."),
    "WELLNESS": ("Stories about health and wellbeing, such as fitness, sleep, mental health, diet and "
                 "disease."),
    "PARENTING": "Stories about parenting, children, babies, pregnancy and family life.",
    "FOOD & DRINK": "Stories about food and drink, such as recipes, cooking, restaurants and beverages.",
    "WOMEN": "News and stories about women, such as women's rights, gender equality and feminism.",
    "QUEER VOICES": ("News and stories about LGBTQ people, such as gay and transgender rights and queer "
                     "culture."),
    "BUSINESS": ("News about business and companies, such as corporations, executives, workers, industries "
                 "and the economy."),
    "MONEY": "Stories about personal finance, such as saving, spending, taxes, debt, prices and jobs.",
    "CULTURE & ARTS": ("News about culture and the arts, such as books, museums, theatre, painting and "
                       "artists."),
    "IMPACT": ("Stories about social impact, such as charity, volunteering, poverty, hunger and people "
               "helping others."),
    "TECH": ("News about technology, such as tech companies, the internet, social media, gadgets and "
             "software."),
    "SCIENCE": "News about science, such as space, physics, biology, research discoveries and scientists.",
    "RELIGION": ("News about religion, such as churches, faith, religious leaders, the Pope and religious "
                 "holidays."),
}

HWU64_DIR = "CrossValidation/autoGeneFromRealAnno/autoGene_2018_03_22-13_01_25_169/CrossValidation/KFold_1"
SNIPS_DIR = "2017-06-custom-intent-engines"
NEWS_FILE = "News_Category_Dataset_v3.json"


@dataclass(frozen=True)
class Source:
    """One public repository at a pinned commit, and how to convert it."""

    name: str
    repository: str
    commit: str
    licence: str
    convert: Callable[[Path, str], Iterator[dict]]
    descriptions: dict[str, str]


def git_show(repo: Path, commit: str, path: str) -> str:
    """The text of ``path`` at ``commit`` in ``repo`` (a clone or a bare git directory)."""
    raw = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], check=True,
                         capture_output=True).stdout
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # some SNIPS files are Latin-1
        return raw.decode("latin-1")


def hwu64_docs(repo: Path, commit: str) -> Iterator[dict]:
    """HWU64's first cross-validation fold: its ``trainset`` (train) and ``testset`` (test).

    Each CSV row (``;``-separated) has ``answerid;scenario;intent;...;answer_from_anno``; the
    label is ``scenario_intent``, the text the normalised utterance (``answer_from_anno``).
    """
    for split, folder in (("train", f"{HWU64_DIR}/trainset"), ("test", f"{HWU64_DIR}/testset/csv")):
        for label in HWU64_DESCRIPTIONS:
            rows = csv.DictReader(io.StringIO(git_show(repo, commit, f"{folder}/{label}.csv")), delimiter=";")
            for line, row in enumerate(rows, start=2):
                if f"{row['scenario']}_{row['intent']}" != label:
                    raise ValueError(f"{folder}/{label}.csv:{line}: field 'intent': "
                                     f"{row['scenario']}_{row['intent']} in the file of {label}")
                text = (row.get("answer_from_anno") or "").strip()
                if text:
                    yield {"id": f"hwu64-{split}-{label}-{line}", "text": text, "labels": [label],
                           "split": split}


def snips_docs(repo: Path, commit: str) -> Iterator[dict]:
    """SNIPS 2017-06: ``train_<Intent>_full.json`` (train) and ``validate_<Intent>.json`` (test,
    the 100 held-out queries per intent the benchmark scores on)."""
    for label in SNIPS_DESCRIPTIONS:
        for split, file in (("train", f"train_{label}_full.json"), ("test", f"validate_{label}.json")):
            queries = json.loads(git_show(repo, commit, f"{SNIPS_DIR}/{label}/{file}"))[label]
            for i, query in enumerate(queries):
                text = "".join(part["text"] for part in query["data"]).strip()
                if text:
                    yield {"id": f"snips-{split}-{label}-{i}", "text": text, "labels": [label],
                           "split": split}


def news_docs(repo: Path, commit: str) -> Iterator[dict]:
    """News Category Dataset excerpt: one JSON object per line (``headline``, ``short_description``,
    ``category``, ``link``); the text is the headline and the short description.

    The dataset has no official split: an article is in ``test`` when the SHA-1 of its link is 0
    modulo 5 (a fifth, the same on every machine). Sections outside ``NEWS_DESCRIPTIONS`` are left out.
    """
    for line_no, line in enumerate(git_show(repo, commit, NEWS_FILE).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{NEWS_FILE}:{line_no}: not a JSON object ({exc})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{NEWS_FILE}:{line_no}: not a JSON object ({type(row).__name__})")
        missing = [field for field in ("category", "link") if not isinstance(row.get(field), str)]
        if missing:
            raise ValueError(f"{NEWS_FILE}:{line_no}: field '{missing[0]}': missing or not text")
        label, link = row["category"], row["link"]
        parts = (row.get("headline") or "", row.get("short_description") or "")
        text = " ".join(part.strip() for part in parts if part.strip())
        if label in NEWS_DESCRIPTIONS and text:
            split = "test" if int(hashlib.sha1(link.encode()).hexdigest(), 16) % 5 == 0 else "train"
            yield {"id": f"news-{line_no}", "text": text, "labels": [label], "split": split}


SOURCES: dict[str, Source] = {
    "hwu64": Source("hwu64", "xliuhw/NLU-Evaluation-Data", "f6071b496b17d71e6eb43f543af0707f4ff30557",
                    "CC BY 4.0", hwu64_docs, HWU64_DESCRIPTIONS),
    "snips": Source("snips", "sonos/nlu-benchmark", "b86ac7f1577868c42158d0dec77db50956046696",
                    "CC0 1.0", snips_docs, SNIPS_DESCRIPTIONS),
    "news": Source("news", "Fred-Stock/Correlated-Topic-Modeling-In-Pytorch",
                   "65ae8edd71e5cc0ba2d32f9d02be0520fe90b006", "CC BY 4.0", news_docs, NEWS_DESCRIPTIONS),
}


def convert(source: Source, repo: Path, out: Path) -> Path:
    """Write ``docs.jsonl`` and ``labels.json`` of ``source`` from ``repo`` under ``out/<name>``.

    Returns:
        The dataset directory.
    """
    target = out / source.name
    target.mkdir(parents=True, exist_ok=True)
    docs = list(source.convert(repo, source.commit))
    tmp = target / "docs.jsonl.tmp"
    tmp.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tmp.replace(target / "docs.jsonl")
    (target / "labels.json").write_text(json.dumps(source.descriptions, indent=1) + "\n")
    (target / "SOURCE.json").write_text(json.dumps(
        {"repository": source.repository, "commit": source.commit, "licence": source.licence},
        indent=1) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(SOURCES))
    parser.add_argument("--repo", type=Path, required=True, help="A clone (or git directory) of the source.")
    parser.add_argument("--out", type=Path, default=Path("runs/datasets"))
    args = parser.parse_args(argv)
    target = convert(SOURCES[args.name], args.repo, args.out)
    counts: dict[str, int] = {}
    for line in (target / "docs.jsonl").read_text().splitlines():
        split = json.loads(line)["split"]
        counts[split] = counts.get(split, 0) + 1
    print(f"{args.name}: {counts} -> {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
