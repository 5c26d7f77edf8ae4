"""--concepts: reading and checking a file (or list) of concepts, before any model is loaded.

Every layout reads into the same Concepts; the run's flags give the defaults; relative paths
follow the file; every mistake is one line naming the file, the concept and the key."""

import json
import os

import pytest

from ti_flax.config import cli, concepts
from ti_flax.config.concepts import Concept
from ti_flax.config import TrainConfig
from ti_flax.errors import UserError
from ti_flax.commands.train import main

TOML = """
[[concepts]]
placeholder_token = "<cat-toy>"
train_data_dir = "cat_toy"
initializer_token = "toy"

[[concepts]]
placeholder_token = "<wc>"
train_data_dir = "/abs/watercolours"
initial_embeddings = "embeds/wc.safetensors"
num_vectors = 2
learnable_property = "style"
caption_extension = ".txt"
repeats = 7
weight = 0.5
"""
ENTRIES = [
    {"placeholder_token": "<cat-toy>", "train_data_dir": "cat_toy", "initializer_token": "toy"},
    {"placeholder_token": "<wc>", "train_data_dir": "/abs/watercolours", "initial_embeddings": "embeds/wc.safetensors",
     "num_vectors": 2, "learnable_property": "style", "caption_extension": ".txt", "repeats": 7, "weight": 0.5},
]


def expected(folder):
    """The two Concepts of TOML/ENTRIES read from a file in `folder`."""
    return (
        Concept("<cat-toy>", os.path.join(folder, "cat_toy"), initializer_token="toy"),
        Concept("<wc>", "/abs/watercolours", initial_embeddings=os.path.join(folder, "embeds", "wc.safetensors"),
                num_vectors=2, learnable_property="style", caption_extension=".txt", repeats=7, weight=0.5),
    )


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, text", [
    ("concepts.toml", TOML),
    ("concepts.json", json.dumps({"concepts": ENTRIES})),
    ("concepts.json", json.dumps(ENTRIES)),
    ("CONCEPTS.JSON", json.dumps(ENTRIES)),
], ids=["toml", "json-object", "json-list", "upper-case"])
def test_every_layout_reads_the_same_concepts(name, text, tmp_path):
    path = write(tmp_path / "sets" / name, text)
    assert concepts.read_file(path) == expected(str(tmp_path / "sets"))


def test_to_dict_reads_back_into_an_equal_concept(tmp_path):
    listed = expected(str(tmp_path))
    again = concepts.parse([c.to_dict() for c in listed], source="x")
    assert again == listed
    assert json.loads(json.dumps(listed[1].to_dict()))["weight"] == 0.5
    assert set(listed[0].to_dict()) == set(concepts.FIELDS)


def test_relative_paths_follow_the_file_not_the_current_directory(tmp_path, monkeypatch):
    path = write(tmp_path / "a" / "b" / "c.toml", TOML.replace('"cat_toy"', '"../imgs/./cat"'))
    monkeypatch.chdir(tmp_path)
    cat, wc = concepts.read_file(os.path.join("a", "b", "c.toml"))
    assert cat.train_data_dir == os.path.join("a", "imgs", "cat")
    assert wc.train_data_dir == "/abs/watercolours"  # absolute: kept
    assert wc.initial_embeddings == os.path.join("a", "b", "embeds", "wc.safetensors")
    assert concepts.read_file(path)[0].train_data_dir == str(tmp_path / "a" / "imgs" / "cat")


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "c.json", json.dumps([{**ENTRIES[0], "train_data_dir": "~/cats"}]))
    assert concepts.read_file(path)[0].train_data_dir == str(tmp_path / "home" / "cats")


def test_the_run_flags_are_the_entries_defaults(tmp_path):
    path = write(tmp_path / "c.toml", TOML)
    config = TrainConfig(pretrained_model_name_or_path="m", concepts=path, repeats=50, num_vectors=3,
                         learnable_property="style", caption_extension=".caption")
    cat, wc = concepts.from_config(config)
    assert (cat.repeats, cat.num_vectors, cat.learnable_property, cat.caption_extension, cat.weight) == (
        50, 3, "style", ".caption", 1.0)
    assert (wc.repeats, wc.num_vectors, wc.learnable_property, wc.caption_extension, wc.weight) == (
        7, 2, "style", ".txt", 0.5)


def test_json_null_turns_a_default_caption_extension_off(tmp_path):
    path = write(tmp_path / "c.json", json.dumps([{**ENTRIES[0], "caption_extension": None}]))
    (cat,) = concepts.read_file(path, {"caption_extension": ".txt"})
    assert cat.caption_extension is None


def test_api_list_form_takes_paths_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(pretrained_model_name_or_path="m", concepts=ENTRIES, repeats=9)
    cat, wc = concepts.from_config(config)
    assert cat == Concept("<cat-toy>", "cat_toy", initializer_token="toy", repeats=9)
    assert wc.initial_embeddings == os.path.join("embeds", "wc.safetensors")
    assert concepts.from_config(config.replace(concepts=tuple(ENTRIES))) == (cat, wc)


def test_without_concepts_the_flags_are_the_one_concept():
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="imgs/", placeholder_token="<t>",
                         initial_embeddings="e.safetensors", num_vectors=4, learnable_property="style",
                         caption_extension=".txt", repeats=3)
    assert concepts.from_config(config) == (
        Concept("<t>", "imgs/", "", "e.safetensors", 4, "style", ".txt", 3, 1.0),
    )


def test_concept_tokens_name_every_vector():
    assert Concept("<a>", "d", "x", num_vectors=3).tokens == ["<a>", "<a>_1", "<a>_2"]


# Each mistake, in a file of two concepts where the second is at fault: (what the second entry
# becomes, words the message must contain besides the file and "concept 2").
GOOD = {"placeholder_token": "<dog>", "train_data_dir": "dog", "initializer_token": "dog"}
ENTRY_ERRORS = {
    "unknown-key": ({**GOOD, "repeat": 3}, ["(<dog>)", "'repeat'", "did you mean 'repeats'", "placeholder_token, "]),
    "str-for-int": ({**GOOD, "num_vectors": "2"}, ["(<dog>)", "num_vectors must be an integer", "'2'"]),
    "bool-for-int": ({**GOOD, "num_vectors": True}, ["(<dog>)", "num_vectors must be an integer", "boolean True"]),
    "float-for-int": ({**GOOD, "repeats": 2.5}, ["(<dog>)", "repeats must be an integer"]),
    "int-for-str": ({**GOOD, "initializer_token": 3}, ["(<dog>)", "initializer_token must be a string"]),
    "bool-for-float": ({**GOOD, "weight": False}, ["(<dog>)", "weight must be a number"]),
    "null-token": ({**GOOD, "placeholder_token": None}, ["placeholder_token must be a string"]),
    "missing-token": ({k: v for k, v in GOOD.items() if k != "placeholder_token"}, ["placeholder_token is required"]),
    "empty-token": ({**GOOD, "placeholder_token": ""}, ["placeholder_token is required"]),
    "missing-dir": ({k: v for k, v in GOOD.items() if k != "train_data_dir"}, ["(<dog>)", "train_data_dir is required"]),
    "both-starts": ({**GOOD, "initial_embeddings": "e.safetensors"},
                    ["(<dog>)", "exactly one of initializer_token", "initial_embeddings", "not both"]),
    "neither-start": ({k: v for k, v in GOOD.items() if k != "initializer_token"},
                      ["(<dog>)", "exactly one of initializer_token", "not neither"]),
    "num-vectors": ({**GOOD, "num_vectors": 0}, ["(<dog>)", "num_vectors must be at least 1, got 0"]),
    "property": ({**GOOD, "learnable_property": "thing"},
                 ["(<dog>)", "learnable_property must be one of object, style, got 'thing'"]),
    "repeats": ({**GOOD, "repeats": 0}, ["(<dog>)", "repeats must be at least 1, got 0"]),
    "weight-zero": ({**GOOD, "weight": 0}, ["(<dog>)", "weight must be a positive number", "got 0.0"]),
    "weight-negative": ({**GOOD, "weight": -1.5}, ["(<dog>)", "weight must be a positive number", "got -1.5"]),
    "weight-nan": ({**GOOD, "weight": float("nan")}, ["(<dog>)", "weight must be a positive number", "got nan"]),
    "weight-inf": ({**GOOD, "weight": float("inf")}, ["(<dog>)", "weight must be a positive number", "got inf"]),
    "caption-no-dot": ({**GOOD, "caption_extension": "txt"}, ["(<dog>)", "caption_extension must be a file extension",
                                                              "'txt'"]),
    "caption-slash": ({**GOOD, "caption_extension": "./x"}, ["(<dog>)", "caption_extension"]),
    "token-space": ({**GOOD, "placeholder_token": "<big dog>"}, ["(<big dog>)", "placeholder_token", "without spaces"]),
    "token-slash": ({**GOOD, "placeholder_token": "<a/b>"}, ["(<a/b>)", "placeholder_token", "output folder"]),
    "token-backslash": ({**GOOD, "placeholder_token": "a\\b"}, ["placeholder_token", "output folder"]),
    "token-dots": ({**GOOD, "placeholder_token": ".."}, ["(..)", "placeholder_token", "output folder"]),
    "not-a-table": ("<dog>", ["must be a table", "got string"]),
}


@pytest.mark.parametrize("layout", [".json", ".toml"])
@pytest.mark.parametrize("case", sorted(ENTRY_ERRORS))
def test_each_bad_entry_is_one_line_naming_file_concept_and_key(case, layout, tmp_path):
    entry, words = ENTRY_ERRORS[case]
    if layout == ".toml" and (not isinstance(entry, dict) or None in entry.values()):
        pytest.skip("TOML has no null and [[concepts]] is always a table")
    path = str(tmp_path / f"set{layout}")
    entries = [ENTRIES[0], entry]
    if layout == ".json":
        write(tmp_path / f"set{layout}", json.dumps(entries))
    else:
        write(tmp_path / f"set{layout}", "".join("[[concepts]]\n" + "".join(
            f"{k} = {toml_value(v)}\n" for k, v in e.items()) for e in entries))
    with pytest.raises(UserError) as err:
        concepts.read_file(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}, concept 2"), message
    for word in words:
        assert word in message, message


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return json.dumps(value)


@pytest.mark.parametrize("name, text, words", [
    ("c.json", '[{"placeholder_token": "<a>",}]', ["not valid JSON", "line 1 column"]),
    ("c.toml", '[[concepts]]\nplaceholder_token = \n', ["not valid TOML", "line 2"]),
    ("c.json", '{"concepts": {"placeholder_token": "<a>"}}', ["must be a list", "got table"]),
    ("c.json", '"<a>"', ["must be a list", "got string"]),
    ("c.json", '[]', ["list is empty"]),
    ("c.json", '{"concepts": []}', ["list is empty"]),
    ("c.toml", 'concepts = []', ["list is empty"]),
    ("c.toml", '[[concept]]\nplaceholder_token = "<a>"\n', ["top-level key 'concept'", "did you mean 'concepts'",
                                                           "[[concepts]]"]),
    ("c.json", '{"other": 1}', ["top-level key 'other'"]),
    ("c.toml", '', ["no concepts", "[[concepts]]"]),
    ("c.yaml", '[]', [".json or .toml", ".yaml"]),
    ("c", '[]', [".json or .toml", "without an extension"]),
])
def test_each_bad_file_is_one_line_naming_it(name, text, words, tmp_path):
    path = write(tmp_path / name, text)
    with pytest.raises(UserError) as err:
        concepts.read_file(path)
    message = str(err.value)
    assert message.startswith(path + ":") and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match=r"/nope\.toml: no such concepts file$"):
        concepts.read_file(str(tmp_path / "nope.toml"))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(UserError, match=r"dir\.json: cannot read the concepts file \(IsADirectoryError"):
        concepts.read_file(str(tmp_path / "dir.json"))
    (tmp_path / "latin1.toml").write_bytes(b'[[concepts]]\nplaceholder_token = "<caf\xe9>"\n')
    with pytest.raises(UserError, match=r"latin1\.toml: cannot read the concepts file \(UnicodeDecodeError"):
        concepts.read_file(str(tmp_path / "latin1.toml"))


@pytest.mark.parametrize("first, second, token", [
    ({"placeholder_token": "<a>"}, {"placeholder_token": "<a>"}, "<a>"),
    ({"placeholder_token": "<a>", "num_vectors": 3}, {"placeholder_token": "<a>_2"}, "<a>_2"),
    ({"placeholder_token": "<a>_1"}, {"placeholder_token": "<a>", "num_vectors": 2}, "<a>_1"),
])
def test_tokens_are_distinct_across_concepts_counting_extra_vectors(first, second, token):
    base = {"train_data_dir": "d", "initializer_token": "x"}
    entries = [{**base, "placeholder_token": "<other>"}, {**base, **first}, {**base, **second}]
    with pytest.raises(UserError) as err:
        concepts.parse(entries, source="set.toml")
    assert str(err.value).startswith(
        f"set.toml: concept 2 ({first['placeholder_token']}) and concept 3 ({second['placeholder_token']}) "
        f"both use the token {token}; give each its own placeholder_token")
    # Apart, they are fine: only a clash is refused.
    assert len(concepts.parse([{**base, **first}, {**base, "placeholder_token": "<b>"}], source="s")) == 2


def test_the_api_list_form_names_itself_in_errors():
    config = TrainConfig(pretrained_model_name_or_path="m", concepts=[{**GOOD, "weight": "1"}])
    message = r"^TrainConfig\.concepts, concept 1 \(<dog>\): weight must be a number, got string '1'$"
    with pytest.raises(UserError, match=message):
        config.validate()
    with pytest.raises(UserError, match="a list of concept dicts, got dict"):
        TrainConfig(pretrained_model_name_or_path="m", concepts=GOOD).validate()


def concepts_config(path, **changes):
    return TrainConfig(pretrained_model_name_or_path="m", concepts=path, output_dir="out", report_to="none",
                       **changes)


@pytest.mark.parametrize("flag, value", [
    ("placeholder_token", "<t>"), ("train_data_dir", "d"), ("initializer_token", "toy"),
    ("initial_embeddings", "e.safetensors"),
])
def test_validate_refuses_a_single_concept_flag_beside_concepts(flag, value, tmp_path):
    config = concepts_config(write(tmp_path / "c.toml", TOML), **{flag: value})
    with pytest.raises(UserError, match=f"^--{flag} is set per concept in --concepts FILE; remove it$"):
        config.validate()


def test_validate_reads_the_concepts_file(tmp_path):
    path = write(tmp_path / "c.toml", TOML)
    assert concepts_config(path).validate().concepts == path
    write(tmp_path / "c.toml", TOML.replace("repeats = 7", "repeats = -7"))
    with pytest.raises(UserError, match=r"c\.toml, concept 2 \(<wc>\): repeats must be at least 1, got -7"):
        concepts_config(path).validate()
    # A bad flag default is reported as the flag, before the file is blamed for it.
    with pytest.raises(UserError, match="^--repeats must be at least 1, got 0$"):
        concepts_config(path, repeats=0).validate()


def test_a_run_reads_the_concepts_file_once(tmp_path, monkeypatch):
    # The command line validates, then train(), then prepare(), which takes the concepts on.
    reads = []
    real = concepts.read_file
    monkeypatch.setattr(concepts, "read_file", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    path = write(tmp_path / "c.toml", TOML)
    config = cli.parse_config(["--pretrained_model_name_or_path", "m", "--concepts", path, "--output_dir",
                               str(tmp_path / "out"), "--report_to", "none"])
    listed = config.validate().concept_list()
    assert [c.placeholder_token for c in listed] == [c.placeholder_token for c in concepts.read_file(path, {})]
    assert reads == [path, path]  # the parse's one read, and this test's own
    assert config == config.replace() and "_checked" not in config.to_json()  # not a field


def test_caption_prefix_token_needs_a_caption_extension_somewhere(tmp_path):
    without = write(tmp_path / "c.json", json.dumps([ENTRIES[0]]))
    with pytest.raises(UserError, match="--caption_prefix_token needs a caption_extension"):
        concepts_config(without, caption_prefix_token=True).validate()
    concepts_config(without, caption_prefix_token=True, caption_extension=".txt").validate()
    concepts_config(write(tmp_path / "d.toml", TOML), caption_prefix_token=True).validate()  # <wc> has .txt


def test_config_json_round_trip_keeps_a_list_of_concepts():
    config = TrainConfig(pretrained_model_name_or_path="m", concepts=[dict(e) for e in ENTRIES])
    again = TrainConfig.from_json(config.to_json())
    assert again == config and again.concepts == ENTRIES
    assert TrainConfig.from_json(config.replace(concepts="c.toml").to_json()).concepts == "c.toml"
    assert TrainConfig.from_json(TrainConfig().to_json()).concepts is None


def test_cli_concepts_alone_replace_the_single_concept_flags(tmp_path):
    path = write(tmp_path / "c.toml", TOML)
    config = cli.parse_config(["--pretrained_model_name_or_path", "m", "--concepts", path,
                               "--output_dir", str(tmp_path / "out"), "--repeats", "50", "--report_to", "none"])
    assert config.concepts == path and config.placeholder_token == "" and config.train_data_dir == ""
    assert [c.repeats for c in concepts.from_config(config)] == [50, 7]


@pytest.mark.parametrize("missing, message", [
    ("--train_data_dir", "error: --train_data_dir is required"),
    ("--placeholder_token", "error: --placeholder_token is required"),
])
def test_cli_without_concepts_still_needs_the_single_concept_flags(missing, message, tmp_path, capsys):
    args = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--placeholder_token", "<t>",
            "--initializer_token", "toy", "--output_dir", str(tmp_path / "out")]
    del args[args.index(missing): args.index(missing) + 2]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "out").exists()


def test_cli_concepts_error_is_one_line(tmp_path, capsys):
    path = write(tmp_path / "c.toml", TOML.replace('"style"', '"styles"'))
    assert main(["--pretrained_model_name_or_path", "m", "--concepts", path, "--output_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {path}, concept 2 (<wc>): learnable_property must be one of object, style, got 'styles'")
