"""Deterministic generator of simple English short stories (TinyStories-like).

The machine that trains rafale's models has no internet, so this module is the
embedded default training data: short stories with a small vocabulary and a
simple plot, written the way one talks to a three or four year old, in the
spirit of the TinyStories data set.  Only the Python standard library is used.

Design: plan -> render
----------------------
Each story is made in two steps, from its own ``random.Random``:

1. ``make_plan(rng)`` draws a ``StoryPlan``: *what* happens.  A hero and a
   friend (named children or animals, each with fixed pronouns), a place, a
   treasured thing, an activity, the weather, one problem out of ``PROBLEMS``
   (lost thing, broken thing, thing stuck up high, storm, something scary,
   argument with the friend) and the ending mood, one of ``MOODS``.
2. ``render(plan, rng)`` turns the plan into text, part by part:
   beginning (who, where, what they like), problem, attempt, ending.  Every
   part has several sentence templates and optional sentences, so the
   same plan can be told in many ways.

The mood is not only a word in the last line: it decides how the attempt goes
(it works for "happy", it fails for "sad", something unexpected happens for
"surprised") and which ending templates are used.  The stories of one mood
share no single word that gives the label away; a classifier has to read the
story.

Adding a label
--------------
Anything stored in ``StoryPlan`` can be a label, because the text is rendered
from the plan.  For example the problem type is already there:
``plan.problem``.  To add a new one, add a field to ``StoryPlan``, draw it in
``make_plan`` and make the render functions depend on it, then return it
from a function like ``generate_labelled_stories``.  Keep the label visible
in the text in several different ways, or a model cannot learn it.

Determinism
-----------
Story ``i`` of seed ``s`` comes from ``random.Random(s * 1_000_003 + i)``, so
it does not depend on ``n``, on other stories, on the process or on
``PYTHONHASHSEED`` (no ``hash()`` of strings, no iteration over sets).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "MOODS",
    "PROBLEMS",
    "StoryPlan",
    "make_plan",
    "render",
    "generate_stories",
    "generate_labelled_stories",
    "story_splits",
    "labelled_story_splits",
]

MOODS = ("happy", "sad", "surprised")
PROBLEMS = ("lost", "broken", "stuck", "storm", "fear", "argument")

# --------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------

GIRL_NAMES = (
    "Abby", "Ada", "Alice", "Amber", "Amy", "Anna", "Ava", "Bella", "Beth",
    "Bonnie", "Brooke", "Carla", "Chloe", "Clara", "Daisy", "Dana", "Della",
    "Dora", "Eden", "Elena", "Eliza", "Ella", "Ellie", "Elsa", "Emily",
    "Emma", "Erin", "Eva", "Faith", "Fiona", "Flora", "Freya", "Gemma",
    "Grace", "Hana", "Hannah", "Hazel", "Heidi", "Holly", "Ida", "Ivy",
    "Jade", "Jane", "Jenny", "Jess", "Jill", "Joy", "Julia", "June", "Kate",
    "Kayla", "Kim", "Lana", "Laura", "Layla", "Leah", "Lena", "Lila", "Lily",
    "Lina", "Lisa", "Lola", "Lucy", "Luna", "Lydia", "Mabel", "Maggie",
    "Maisie", "Maria", "Maya", "Megan", "Mia", "Millie", "Molly", "Nadia",
    "Naomi", "Nell", "Nina", "Nora", "Olive", "Olivia", "Opal", "Paige",
    "Pam", "Penny", "Pia", "Polly", "Poppy", "Quinn", "Rachel", "Rita",
    "Rosa", "Rose", "Rosie", "Ruby", "Ruth", "Sadie", "Sally", "Sara",
    "Sasha", "Sophie", "Stella", "Sue", "Tara", "Tess", "Tilly", "Tina",
    "Una", "Vera", "Violet", "Wendy", "Willow", "Yara", "Zara", "Zoe",
    "Zoey", "Alma", "Bea", "Cora", "Edie", "Gina", "Iris", "Kira", "Lara",
    "Mara", "Nola", "Rina", "Thea", "Uma", "Wren",
)

BOY_NAMES = (
    "Adam", "Alex", "Alfie", "Andy", "Ben", "Billy", "Bobby", "Brian",
    "Caleb", "Carl", "Charlie", "Chris", "Dan", "Danny", "David", "Dean",
    "Eddie", "Eli", "Eric", "Ethan", "Evan", "Felix", "Finn", "Frank",
    "Fred", "Gabe", "George", "Gus", "Hank", "Harry", "Henry", "Hugo",
    "Ian", "Isaac", "Jack", "Jacob", "Jake", "James", "Jay", "Jim", "Joe",
    "Joel", "John", "Jonah", "Josh", "Kai", "Ken", "Kevin", "Kyle", "Leo",
    "Leon", "Levi", "Liam", "Louis", "Luca", "Luke", "Mark", "Matt", "Max",
    "Mike", "Milo", "Nate", "Ned", "Nick", "Noah", "Oliver", "Omar", "Oscar",
    "Owen", "Pablo", "Paul", "Pete", "Phil", "Ray", "Reed", "Rex", "Ricky",
    "Rob", "Rory", "Ross", "Ryan", "Sam", "Sean", "Seth", "Simon", "Steve",
    "Ted", "Theo", "Tim", "Timmy", "Toby", "Todd", "Tom", "Tommy", "Tony",
    "Victor", "Vince", "Walt", "Will", "Zack", "Zane", "Abe", "Arlo", "Bruno",
    "Cody", "Dylan", "Emil", "Ezra", "Gary", "Ivan", "Jasper", "Jude",
    "Kofi", "Lars", "Marco", "Nico", "Otto", "Quentin", "Rafael", "Remy",
    "Rudy", "Sid", "Tariq", "Ugo", "Wade", "Yusuf",
)

# Pets and toy-like animals get names that fit either pronoun.
PET_NAMES = (
    "Pip", "Coco", "Sunny", "Buttons", "Pepper", "Biscuit", "Patch", "Nutmeg",
    "Ziggy", "Bubbles", "Cookie", "Peanut", "Pebble", "Muffin", "Dotty",
    "Scout", "Twinkle", "Whiskers", "Honey", "Bean", "Socks", "Maple",
    "Sprout", "Noodle", "Pudding", "Tumble", "Clover", "Jelly", "Button",
    "Snowy", "Fuzzy", "Toffee", "Puddle", "Berry", "Acorn", "Hoppy",
)

ANIMALS = (
    "fox", "rabbit", "bear", "mouse", "puppy", "kitten", "duck", "squirrel",
    "frog", "hedgehog", "turtle", "lamb", "pig", "elephant", "monkey",
    "penguin", "owl", "otter", "deer", "goat", "bird", "raccoon", "beaver",
    "panda", "giraffe", "zebra", "tiger", "bunny", "chick", "lion", "koala",
    "hippo", "badger", "mole", "seal", "pony",
)

ANIMAL_ADJECTIVES = (
    "little", "small", "tiny", "young", "brave", "shy", "fluffy", "curious",
    "playful", "gentle", "clever", "happy", "sleepy", "busy",
)

CHILD_ADJECTIVES = ("", "", "little", "kind", "brave", "shy", "curious",
                    "cheerful", "playful", "clever", "friendly", "happy")

TRAITS = ("kind", "brave", "gentle", "cheerful", "curious", "playful",
          "clever", "friendly", "shy", "silly", "quiet", "busy", "helpful",
          "happy", "funny", "careful")

ACTIVITIES = (
    "playing in the sun", "picking flowers", "singing songs",
    "jumping in puddles", "looking at the clouds", "running with the wind",
    "drawing pictures", "reading picture books", "counting the stars",
    "playing hide and seek", "dancing", "building towers with blocks",
    "watching the birds", "collecting pretty stones", "blowing bubbles",
    "climbing trees", "making mud pies", "chasing butterflies",
    "telling silly jokes", "baking cookies", "splashing in the water",
    "rolling down hills", "looking for bugs", "humming little tunes",
)

WEATHERS = ("sunny", "bright", "warm", "windy", "cool", "lovely",
            "beautiful", "quiet", "golden", "breezy")
TIMES = ("morning", "afternoon", "day")

ADULTS = (  # (how the hero says it after "his"/"her", name form, pronoun)
    ("mom", "Mom", "she"), ("dad", "Dad", "he"),
    ("grandma", "Grandma", "she"), ("grandpa", "Grandpa", "he"),
)

GAMES = ("tag", "hide and seek", "house", "pirates", "catch", "jump rope",
         "follow the leader", "shop")

GIFTS = ("a crown made of flowers", "a drawing of the two of them",
         "a shiny new marble", "a little cake with a cherry on top",
         "a pretty stone shaped like a heart", "a paper boat",
         "a basket of sweet berries", "a bracelet made of shells")

# Surprising things that can be found with a lost object.
LOST_TWISTS = (
    "a tiny kitten was curled up asleep right on top of it",
    "a squirrel was holding it in its little paws",
    "a fat duck was sitting on it as if it were an egg",
    "a puppy was carrying it in its mouth and wagging its tail",
    "a family of ladybugs had made it their new home",
    "a little hedgehog was hiding under it, fast asleep",
)

# --------------------------------------------------------------------------
# Plan pieces
# --------------------------------------------------------------------------

PRONOUNS = {  # subject, object, possessive, reflexive
    "he": ("he", "him", "his", "himself"),
    "she": ("she", "her", "her", "herself"),
}


@dataclass(frozen=True)
class Character:
    name: str      # how the story refers to them: "Mia", "the little fox"
    intro: str     # first mention, with its article: "a girl named Mia"
    call: str      # in dialogue: "Mia", "Little Fox"
    pronoun: str   # "he" or "she"
    species: str   # "girl", "boy", or an animal from ANIMALS


@dataclass(frozen=True)
class Place:
    name: str                  # "the park"
    at: str                    # "in the park"
    sights: tuple[str, ...]    # things one sees there
    spots: tuple[str, ...]     # where a lost thing may be
    high: tuple[str, ...]      # where a thing gets stuck
    shelters: tuple[str, ...]  # where to hide from a storm


@dataclass(frozen=True)
class Thing:
    noun: str
    adjectives: tuple[str, ...]
    broke: str | None  # "The kite {broke}." ; None if it cannot break
    fix: str           # what mends it
    can_stick: bool    # can the wind or a throw leave it up a tree


@dataclass(frozen=True)
class Fear:
    the: str     # "the big dog"
    intro: str   # templates, formatted with the story's slots
    gentle: str  # happy resolution: it was not scary after all
    twist: str   # surprised resolution


PLACES = (
    Place("the park", "in the park",
          ("tall green trees", "a big red slide", "a little pond with ducks",
           "soft green grass", "swings that went up high"),
          ("under the slide", "behind a big tree", "in the tall grass",
           "under a bench", "near the pond"),
          ("at the top of a tall tree", "on the roof of the little playhouse"),
          ("under the big slide", "in the little playhouse")),
    Place("the garden", "in the garden",
          ("bright red roses", "tall sunflowers", "a little stone path",
           "buzzing bees", "a big apple tree"),
          ("under the roses", "behind the sunflowers", "next to the watering can",
           "under a big leaf", "by the garden gate"),
          ("high up in the apple tree", "on top of the garden shed"),
          ("in the garden shed", "under the porch")),
    Place("the beach", "at the beach",
          ("soft yellow sand", "big blue waves", "pretty shells",
           "a red lighthouse", "white seagulls"),
          ("under the sand", "behind a big rock", "near the water",
           "inside a sand castle", "under a beach towel"),
          ("on top of a tall rock", "on the roof of a little beach hut"),
          ("in a little beach hut", "in a cave by the rocks")),
    Place("the forest", "in the forest",
          ("tall old trees", "soft green moss", "a little stream",
           "mushrooms of every color", "singing birds"),
          ("under a pile of leaves", "behind an old log", "by the little stream",
           "under a bush", "next to a big mushroom"),
          ("high up in an old oak tree", "at the top of a tall pine tree"),
          ("in a hollow tree", "in a little cave")),
    Place("the farm", "on the farm",
          ("a big red barn", "fat pink pigs", "fluffy white sheep",
           "a noisy rooster", "fields of yellow corn"),
          ("in the hay", "behind the barn", "next to the pig pen",
           "under the old tractor", "in the corn field"),
          ("on the roof of the barn", "high up in the apple tree"),
          ("in the big red barn", "in the warm hen house")),
    Place("the meadow", "in the meadow",
          ("tall grass", "purple flowers", "busy butterflies", "a little hill",
           "a sleepy old tree"),
          ("in the tall grass", "behind the little hill", "under the flowers",
           "near a rabbit hole", "by the old fence"),
          ("at the top of the old tree", "on top of the tall fence"),
          ("in a little wooden shed", "in a hollow log")),
    Place("the lake", "by the lake",
          ("clear blue water", "a little wooden dock", "green lily pads",
           "quacking ducks", "tall reeds"),
          ("in the tall reeds", "under the dock", "by the water",
           "behind a rock", "near the boat house"),
          ("at the top of a tall willow tree", "on the roof of the boat house"),
          ("in the old boat house", "under the wooden dock")),
    Place("the backyard", "in the backyard",
          ("a wooden swing", "a little sandbox", "a big tree with a rope",
           "a vegetable patch", "a tall fence"),
          ("in the sandbox", "under the swing", "behind the bushes",
           "under the porch", "by the flower pots"),
          ("at the top of the big tree", "on the roof of the house"),
          ("in the tree house", "under the porch")),
    Place("the playground", "at the playground",
          ("a tall slide", "a sandbox", "a climbing frame", "a merry-go-round",
           "bright swings"),
          ("under the slide", "in the sandbox", "behind the swings",
           "under a bench", "by the gate"),
          ("at the top of the climbing frame", "in a tree by the fence"),
          ("under the big slide", "in the little tunnel")),
    Place("the hill", "on the hill",
          ("soft green grass", "a big flat rock", "wild flowers", "a view of the town",
           "a lonely old tree"),
          ("behind the big rock", "in the wild flowers", "under the old tree",
           "at the bottom of the hill", "by a little bush"),
          ("at the top of the lonely old tree", "on top of the big rock"),
          ("in a little cave", "under the big rock")),
)

THINGS = (
    Thing("ball", ("red", "blue", "bouncy", "big", "shiny", "striped"),
          "went flat", "a little patch", True),
    Thing("kite", ("red", "yellow", "rainbow", "big", "green"),
          "tore", "some tape", True),
    Thing("teddy bear", ("brown", "soft", "old", "fluffy", "little"),
          "lost an ear", "a needle and thread", False),
    Thing("rag doll", ("pretty", "little", "old", "soft"),
          "lost an arm", "a needle and thread", False),
    Thing("toy car", ("red", "blue", "little", "fast", "shiny"),
          "lost a wheel", "some glue", False),
    Thing("toy boat", ("little", "wooden", "blue", "white"),
          "cracked", "some glue", False),
    Thing("hat", ("yellow", "straw", "warm", "floppy", "green"),
          None, "", True),
    Thing("scarf", ("woolly", "striped", "red", "long", "soft"),
          None, "", True),
    Thing("robot", ("toy", "silver", "little", "shiny"),
          "stopped working", "a tiny screwdriver", False),
    Thing("drum", ("little", "red", "toy"),
          "split", "some tape", False),
    Thing("book", ("picture", "story", "big", "old"),
          "tore", "some tape", False),
    Thing("train", ("toy", "wooden", "little"),
          "lost a wheel", "some glue", False),
    Thing("music box", ("little", "golden", "old"),
          "stopped playing", "a tiny screwdriver", False),
    Thing("umbrella", ("yellow", "red", "spotted", "little"),
          "bent", "some tape", True),
    Thing("plane", ("paper",), "tore", "some tape", True),
    Thing("balloon", ("red", "big", "shiny", "purple"), None, "", True),
    Thing("blanket", ("soft", "blue", "warm", "little"), None, "", False),
    Thing("shell", ("pink", "pretty", "shiny", "white"),
          "cracked", "some glue", False),
    Thing("spinning top", ("little", "red", "wooden"),
          "cracked", "some glue", False),
    Thing("frisbee", ("red", "orange", "blue", "green"),
          "cracked", "some tape", True),
    Thing("bucket", ("little", "red", "blue", "yellow"),
          "cracked", "some tape", False),
    Thing("crown", ("paper", "golden", "shiny"),
          "bent", "some tape", True),
    Thing("yo-yo", ("red", "blue", "glowing", "little"),
          "lost its string", "a new string", True),
    Thing("flute", ("little", "wooden", "silver"),
          "cracked", "some glue", False),
)

FEARS = (
    Fear("the big dog",
         "Suddenly, a big dog ran up to {hero}. It barked loudly: woof, woof!",
         "The big dog wagged its tail and licked {hero_s} hand. It only wanted to play!",
         "The big dog was not angry at all. It had found a tiny lost kitten, "
         "and it was barking to ask for help!"),
    Fear("the noise",
         "Then {hero} heard a strange noise in the bushes. Rustle, rustle, rustle!",
         "Out hopped a little brown bunny. It was only a bunny!",
         "Out jumped all of {hero_s} friends, shouting, \"Surprise!\" "
         "They had planned a party just for {him}!"),
    Fear("the shadow",
         "Then {hero} saw a big, dark shadow moving on the ground. "
         "It had long arms and a round head.",
         "It was only the shadow of a tree, waving in the wind.",
         "It was the shadow of a tiny mouse standing on a rock and holding "
         "up a big leaf like an umbrella!"),
    Fear("the bee",
         "Then a big bee flew around {hero_s} head. Buzz, buzz, buzz!",
         "The bee did not sting. It just flew away to the flowers to make honey.",
         "The bee flew in a circle and then led them to a bush full of sweet, "
         "ripe berries!"),
    Fear("the frog",
         "Then a big green frog jumped out right in front of {hero}. Ribbit!",
         "The frog just sat there and blinked. Then it hopped away into the grass.",
         "The frog opened its mouth, and out came a tiny song. It was a "
         "singing frog!"),
    Fear("the spider",
         "Then {hero} saw a big, hairy spider on a leaf, right next to {him}.",
         "The spider was busy making a web. It did not even look at {him}.",
         "The spider had made a huge web, and it sparkled in the sun like a "
         "necklace of tiny rainbows!"),
    Fear("the eyes",
         "Then {hero} saw a dark hole under a tree. Two yellow eyes were "
         "looking out of it!",
         "It was only a sleepy old owl. It said \"hoo\" and closed its eyes again.",
         "Out came a mother fox with three tiny babies, and they all sat "
         "down to look at {him}!"),
)


@dataclass(frozen=True)
class StoryPlan:
    hero: Character
    friend: Character
    adult: tuple[str, str, str]  # an entry of ADULTS
    place: Place
    thing: Thing
    thing_adjective: str
    activity: str
    weather: str
    time: str
    problem: str          # one of PROBLEMS
    fear: Fear | None     # set when problem == "fear"
    mood: str             # one of MOODS: the ending, and the label
    n_paragraphs: int     # 1 to 4


# --------------------------------------------------------------------------
# Small grammar helpers
# --------------------------------------------------------------------------

def article(phrase: str) -> str:
    """'a' or 'an' + phrase.  Our word lists avoid silent-h and 'you'-sound
    words (hour, unicorn), so the first letter decides."""
    return ("an " if phrase[0] in "aeiouAEIOU" else "a ") + phrase


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def distinct(rng: random.Random, options: tuple, k: int) -> list:
    """k different items of options; cheaper than rng.sample for tiny k."""
    out: list = []
    while len(out) < k:
        x = rng.choice(options)
        if x not in out:
            out.append(x)
    return out


def possessive(name: str) -> str:
    return name + "'" if name.endswith("s") else name + "'s"


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------

def make_character(rng: random.Random, avoid: Character | None = None) -> Character:
    """A child (65%), a named animal (20%) or an animal called by its kind
    ("the little fox", 15%).  `avoid` keeps the friend from sharing the
    hero's name or species, which would make "he"/"she" confusing."""
    while True:
        pronoun = rng.choice(("he", "she"))
        roll = rng.random()
        if roll < 0.65:
            species = "girl" if pronoun == "she" else "boy"
            name = rng.choice(GIRL_NAMES if pronoun == "she" else BOY_NAMES)
            adjective = rng.choice(CHILD_ADJECTIVES)
            kind = f"{adjective} {species}" if adjective else species
            c = Character(name, f"{article(kind)} named {name}", name, pronoun, species)
        elif roll < 0.85:
            species = rng.choice(ANIMALS)
            name = rng.choice(PET_NAMES)
            kind = f"{rng.choice(ANIMAL_ADJECTIVES)} {species}"
            c = Character(name, f"{article(kind)} named {name}", name, pronoun, species)
        else:
            species = rng.choice(ANIMALS)
            kind = f"{rng.choice(ANIMAL_ADJECTIVES)} {species}"
            c = Character(f"the {kind}", article(kind), kind.title(), pronoun, species)
        if avoid is None or (c.name != avoid.name and
                             (c.species != avoid.species or c.species in ("girl", "boy"))):
            return c


def make_plan(rng: random.Random) -> StoryPlan:
    hero = make_character(rng)
    friend = make_character(rng, avoid=hero)
    thing = rng.choice(THINGS)
    # Only problems that make sense for this thing: a blanket cannot break,
    # a teddy bear does not fly up a tree.
    problems = [p for p in PROBLEMS
                if (p != "broken" or thing.broke) and (p != "stuck" or thing.can_stick)]
    problem = rng.choice(problems)
    return StoryPlan(
        hero=hero,
        friend=friend,
        adult=rng.choice(ADULTS),
        place=rng.choice(PLACES),
        thing=thing,
        thing_adjective=rng.choice(thing.adjectives),
        activity=rng.choice(ACTIVITIES),
        weather=rng.choice(WEATHERS),
        time=rng.choice(TIMES),
        problem=problem,
        fear=rng.choice(FEARS) if problem == "fear" else None,
        mood=rng.choice(MOODS),
        # More paragraphs are more common, as in TinyStories.
        n_paragraphs=rng.choices((1, 2, 3, 4), weights=(1, 2, 3, 4))[0],
    )


# --------------------------------------------------------------------------
# Templates.  Slots are filled by `slots()`; a slot written with a capital
# first letter ("{Hero}", "{He}") is the same value capitalised, for the
# start of a sentence.
# --------------------------------------------------------------------------

OPENINGS = (
    "Once upon a time, there was {hero_intro} who lived near {place}.",
    "Once upon a time, {hero_intro} lived in a little house near {place}.",
    "There once was {hero_intro}.",
    "In a small town, there lived {hero_intro}.",
    "Not long ago, in a cozy little house, there lived {hero_intro}.",
    "{Hero_intro} lived in a little house with a green door.",
)
TRAIT_LINES = (
    "{He} was {trait1} and {trait2}.",
    "Everyone said that {hero} was very {trait1}.",
    "{Hero} was a {trait1} friend to everyone.",
)
LIKE_LINES = (
    "{He} loved {activity}.",
    "More than anything, {he} liked {activity}.",
    "{His} favorite thing to do was {activity}.",
    "Every day, {hero} spent hours {activity}.",
)
THING_LINES = (
    "{He} had {a_thing} that {he} loved very much.",
    "{His} most special thing was {a_thing}.",
    "{Hero} took {his} {thing_full} everywhere.",
    "{His} {adult} had given {him} {a_thing} for {his} birthday, and {he} "
    "loved it more than anything.",
)
FRIEND_LINES = (
    "{His} best friend was {friend_intro}.",
    "Next door lived {hero_s} best friend, {friend_intro}.",
    "{Hero} often played with {friend_intro}.",
)
GO_LINES = (
    "One {weather} {time}, {hero} and {friend} went to {place}.",
    "One {weather} {time}, {hero} took {his} {thing} to {place} to play with {friend}.",
    "On a {weather} {time}, {hero} and {friend} went to play {at_place}.",
)
# Opening that starts at the place; used instead of OPENINGS + GO_LINES.
ARRIVALS = (
    "One {weather} {time}, {hero_intro} went to {place} with {his} best "
    "friend, {friend_intro}.",
    "On a {weather} {time}, {hero_intro} and {friend_intro} went to play {at_place}.",
)
# After ARRIVALS two characters are on stage, so these name the hero.
ARRIVAL_LINES = (
    "{Hero} had brought {his} {thing_full} along.",
    "{Hero} carried {his} {thing_full}, {his} most special thing.",
    "{Hero} loved {activity}, and {he} never went anywhere without {his} {thing_full}.",
)
SIGHT_LINES = (
    "{Place} had {sight1} and {sight2}.",
    "{At_place}, they saw {sight1} and {sight2}.",
    "They ran past {sight1} and {sight2}.",
)
PLAY_LINES = (
    "They played for a long time and had lots of fun.",
    "{Hero} and {friend} ran and jumped and played.",
    "They played {game} and then sat down to rest.",
)

# Problem part.  Sadness and fear show up here in *every* mood, so that words
# like "sad" or "cried" do not give the ending away.
PROBLEM_EVENTS = {
    "lost": (
        "After a while, {hero} looked around. {His} {thing} was gone!",
        "When it was time to go home, {hero} could not find {his} {thing} anywhere.",
        "Suddenly, {hero} stopped. \"Oh no! Where is my {thing}?\" {he} cried. "
        "It was not where {he} had left it.",
        "{Hero} played so much that {he} forgot all about {his} {thing}. "
        "When {he} looked for it, it was gone.",
    ),
    "broken": (
        "{Hero} was playing with {his} {thing} when it fell on a hard stone. "
        "The {thing} {broke}!",
        "{Friend} asked to hold the {thing}. But it slipped out of {f_his} "
        "hands, and the {thing} {broke}.",
        "Then {hero} tripped, and {his} {thing} fell to the ground. Oh no! "
        "The {thing} {broke}.",
    ),
    "stuck": (
        "Then a big gust of wind came. It lifted {his} {thing} up, up, up, "
        "and it got stuck {high}.",
        "{Hero} threw {his} {thing} high into the air. But it did not come "
        "down. It was stuck {high}!",
        "{Friend} tossed the {thing} to {hero}, but it flew too high and "
        "landed {high}.",
    ),
    "storm": (
        "Suddenly, the sky turned dark. Big gray clouds rolled in, and the "
        "wind began to blow. Then came a loud boom of thunder!",
        "But soon, black clouds covered the sun. Drip, drop went the rain. "
        "Then it rained harder and harder, and thunder rumbled across the sky.",
        "Then the wind started to howl. The trees bent, the leaves flew, and "
        "big drops of rain began to fall.",
    ),
    "fear": ("{fear_intro}",),
    "argument": (
        "Then {friend} wanted to play with {hero_s} {thing}. \"No, it is "
        "mine!\" said {hero}. {Friend} pulled one way, and {hero} pulled the "
        "other way.",
        "{Hero} wanted to play with {his} {thing}, but {friend} wanted to "
        "play {game}. \"You never want to play my games!\" said {friend}.",
        "{Friend} took {hero_s} {thing} without asking. \"Give it back!\" "
        "shouted {hero}. \"I only wanted to look at it!\" shouted {friend}.",
    ),
}
PROBLEM_FEELINGS = {
    "lost": ("{Hero} felt very sad.", "{Hero_s} eyes filled with tears.",
             "{He} felt a big lump in {his} throat.", "{Hero} was very worried.",
             "{He} sat down on the ground and started to cry."),
    "broken": ("\"My {thing}!\" cried {hero}. \"It is broken!\"",
               "{Hero} felt very sad.", "{Hero_s} lip began to shake.",
               "{He} picked up the pieces and started to cry."),
    "stuck": ("\"How will we get it down?\" asked {hero}.",
              "{Hero} jumped and jumped, but {he} could not reach it.",
              "{Hero} felt sad and worried."),
    "storm": ("{Hero} was scared of the storm.",
              "{Hero} held {his} {thing} close and shivered.",
              "\"I don't like storms,\" said {hero} in a small voice."),
    "fear": ("{Hero} was very scared.", "{Hero_s} heart went thump, thump, thump.",
             "{He} hid behind {friend} and started to cry.",
             "{He} wanted to run away."),
    "argument": ("Soon they were both angry, and they did not talk for a long time.",
                 "{Hero} stomped {his} foot and turned away.",
                 "{Friend} crossed {f_his} arms and frowned.",
                 "{Hero} felt sad and cross at the same time."),
}

# Attempt part: how the problem is met depends on the ending mood.
ATTEMPTS = {
    ("lost", "happy"): (
        "{Friend} came to help. \"Don't worry, {hero_call}. We will find it "
        "together,\" {f_he} said. They looked {spot1} and {spot2}. At last, "
        "{friend} shouted, \"I see it!\" The {thing} was {spot3}.",
        "\"Let's think,\" said {friend}. \"Where did you play last?\" They "
        "went back {spot1}, and there it was! {Hero} picked up {his} {thing} "
        "and held it tight.",
    ),
    ("lost", "sad"): (
        "{Friend} helped {him} look. They looked {spot1} and {spot2}. They "
        "looked until the sun went down, but the {thing} was nowhere to be found.",
        "\"Maybe it is {spot1},\" said {friend}. But it was not there. It was "
        "not {spot2} either. The {thing} was gone, and it did not come back.",
    ),
    ("lost", "surprised"): (
        "They looked {spot1} and {spot2}. Then {hero} heard a tiny sound "
        "{spot3}. {He} peeked, and there was the {thing}. But {lost_twist}!",
        "{Friend} pointed {spot1} and whispered, \"Look!\" There was the "
        "{thing}, and {lost_twist}!",
    ),
    ("broken", "happy"): (
        "{Friend} said, \"I know! Let's fix it with {fix}.\" They worked and "
        "worked, and soon the {thing} was as good as new.",
        "{Hero} took the {thing} to {his} {adult}. {Adult_name} looked at it "
        "carefully. Then {adult_he} got {fix} and fixed it, and the {thing} "
        "worked again.",
    ),
    ("broken", "sad"): (
        "They tried to fix it with {fix}, but it did not work. The {thing} "
        "was still broken.",
        "{Hero} took the pieces to {his} {adult}. \"I am sorry,\" said "
        "{adult_name}. \"I don't think we can fix this one.\"",
    ),
    ("broken", "surprised"): (
        "{His} {adult} took the broken {thing} away. The next morning, there "
        "was a box on {hero_s} bed. Inside was the {thing}, fixed and painted "
        "with bright new stars!",
        "{Friend} looked at the pieces and had an idea. Together they turned "
        "them into a tiny house for the ladybugs, with a door and a window!",
    ),
    ("stuck", "happy"): (
        "{Friend} found a long stick. {F_he} reached up and poked the {thing} "
        "until it fell down, right into {hero_s} arms.",
        "\"I can help,\" said {friend}. {F_he} climbed up very carefully and "
        "brought the {thing} back down.",
    ),
    ("stuck", "sad"): (
        "They tried to reach it with a long stick, but it was too high. Then "
        "the wind blew again and carried the {thing} far, far away.",
        "{Friend} tried to climb up, but {f_he} slipped and had to stop. The "
        "{thing} stayed up there, and they could not get it back.",
    ),
    ("stuck", "surprised"): (
        "Just then, a big bird flew down. It picked up the {thing} in its beak "
        "and dropped it right at {hero_s} feet!",
        "Suddenly, a little squirrel ran up and gave the {thing} a push with "
        "its nose. Down it came, bump, bump, bump!",
    ),
    ("storm", "happy"): (
        "{Friend} took {hero_s} hand. \"Come on! We can hide {shelter}!\" "
        "They ran and stayed there, warm and dry, until the rain stopped.",
        "\"Don't be scared,\" said {friend}. They sat close together "
        "{shelter} and sang songs until the storm went away.",
    ),
    ("storm", "sad"): (
        "They ran for home, but the rain was too fast. {Hero} slipped in the "
        "mud, and {his} {thing} fell into a big puddle and was ruined.",
        "They tried to hide {shelter}, but the wind was too strong. The rain "
        "got them wet all over, and the wind blew {hero_s} {thing} away.",
    ),
    ("storm", "surprised"): (
        "They hid {shelter} until the rain stopped. When they came out, the "
        "biggest rainbow {hero} had ever seen stretched across the sky!",
        "While they hid {shelter}, a tiny wet kitten came in too. It curled up "
        "in {hero_s} lap and started to purr!",
    ),
    ("fear", "happy"): (
        "{Friend} took {hero_s} hand. \"Don't be scared, {hero_call},\" {f_he} "
        "whispered. \"I am right here.\" {Hero} took a deep breath and looked "
        "again. {fear_gentle}",
        "\"Let's be brave together,\" said {friend}. They stepped closer, one "
        "small step at a time. {fear_gentle}",
    ),
    ("fear", "sad"): (
        "{Hero} was so scared that {he} could not move. \"I want to go home!\" "
        "{he} cried. {Friend} tried to help, but {hero} ran all the way home.",
        "{Friend} said, \"It is okay, let's look.\" But {hero} was too scared "
        "to look. {He} ran away and left {his} {thing} behind.",
    ),
    ("fear", "surprised"): (
        "{Hero} wanted to run away, but {friend} said, \"Wait! Let's look.\" "
        "They tiptoed closer. {fear_twist}",
        "{Hero} shut {his} eyes tight. When {he} opened them again, {he} saw "
        "what it really was. {fear_twist}",
    ),
    ("argument", "happy"): (
        "After a while, {hero} felt bad. {He} walked over to {friend} and "
        "said, \"I am sorry. Let's play together.\" {Friend} smiled. \"I am "
        "sorry too,\" {f_he} said. They took turns with the {thing}.",
        "Then {hero} had an idea. \"We can play {game} first, and then with "
        "my {thing},\" {he} said. {Friend} nodded, and they shook hands.",
    ),
    ("argument", "sad"): (
        "{Hero} tried to say sorry, but {friend} did not want to listen. "
        "{Friend} went home, and {hero} was all alone {at_place}.",
        "{Friend} ran off and did not come back. {Hero} waited and waited, "
        "but nobody came to play with {him}.",
    ),
    ("argument", "surprised"): (
        "{Hero} sat down alone. Then {friend} walked over, hiding something "
        "behind {f_his} back. It was {gift}! \"This is for you. I am sorry,\" "
        "said {friend}.",
        "After a while, {friend} tapped {hero} on the shoulder. {F_he} was holding "
        "{gift}. \"Can we be friends again?\" {f_he} asked.",
    ),
}

# Ending part: a reaction right away, maybe a line tied to the problem, maybe
# a line about later that day, maybe a lesson; in that order, so time runs
# forward.
ENDINGS_NOW = {
    "happy": (
        "{Hero} gave {friend} a big hug. \"Thank you, {friend_call}! You are "
        "the best friend ever,\" {he} said.",
        "{Hero} smiled from ear to ear. It had turned into a wonderful day after all.",
        "{Hero} and {friend} played together until the sun went down. They "
        "laughed and laughed.",
        "{Hero} felt warm and happy inside, like a cup of hot cocoa.",
        "{Hero} clapped {his} hands and did a little happy dance.",
        "Everything was right again, and {hero} felt as light as a feather.",
    ),
    "sad": (
        "{Hero} walked home slowly, with {his} head hanging low.",
        "A big tear rolled down {hero_s} cheek.",
        "{Hero} did not feel like playing anymore. {He} just wanted to be alone.",
        "It was a gray and gloomy day for {hero}, even when the sun came out.",
        "{He} sat down and sighed. Nothing felt fun anymore.",
    ),
    "surprised": (
        "{Hero} could not believe {his} eyes. What a surprise!",
        "{Hero_s} mouth fell open. {He} had never seen anything like it.",
        "\"Wow!\" said {hero}. \"I never thought that would happen!\"",
        "{Hero} and {friend} looked at each other with big, round eyes.",
        "{Hero} blinked and rubbed {his} eyes. Was {he} dreaming?",
        "{Hero} gasped, and then {he} began to giggle. Nobody would ever "
        "believe this!",
    ),
}
ENDINGS_LATER = {
    "happy": (
        "That night, {hero} fell asleep with a big smile on {his} face.",
        "When {he} got home, {he} told {his} {adult} all about it. "
        "{Adult_name} smiled and said, \"I am so proud of you.\"",
        "At bedtime, {hero} told {his} {adult} the whole story, and they "
        "both laughed.",
    ),
    "sad": (
        "That night, {hero} could not sleep. {He} lay in bed and stared at "
        "the dark ceiling.",
        "{His} {adult} gave {him} a hug, but {hero} still felt a heavy ache "
        "in {his} heart.",
        "At dinner, {hero} did not eat a single bite. {He} was too sad.",
    ),
    "surprised": (
        "When {he} got home, {he} told {his} {adult} about it. {Adult_name} "
        "was so amazed that {adult_he} had to sit down.",
        "That night, {hero} lay in bed with a big grin. It had been the most "
        "unexpected day of {his} whole life.",
        "At dinner, {hero} told everyone the story, and nobody could believe it.",
    ),
}
CLOSINGS = {
    ("lost", "happy"): "{He} held {his} {thing} tight and promised never to lose it again.",
    ("lost", "sad"): "{He} hoped that one day {his} {thing} would turn up again.",
    ("lost", "surprised"): "{Hero} laughed. {His} {thing} had turned up in "
                           "the funniest way!",
    ("broken", "happy"): "{Hero} promised to take good care of {his} {thing} from then on.",
    ("broken", "sad"): "{He} put the broken pieces in a little box under {his} bed.",
    ("broken", "surprised"): "{Hero} had never thought a broken {thing} could "
                             "lead to something so wonderful.",
    ("stuck", "happy"): "{He} hugged {his} {thing} and said, \"I will hold "
                        "on tight next time!\"",
    ("stuck", "sad"): "{He} looked up at the sky and wondered where {his} "
                      "{thing} had gone.",
    ("stuck", "surprised"): "\"Thank you, little friend!\" {hero} called, "
                            "waving at the trees.",
    ("storm", "happy"): "When the sun came out again, they jumped in the "
                        "puddles all the way home.",
    ("storm", "sad"): "{He} wished the storm had never come.",
    ("storm", "surprised"): "{Hero} never knew a storm could bring something so wonderful.",
    ("fear", "happy"): "{Hero} learned that things are not always as scary as they seem.",
    ("fear", "sad"): "{Hero} stayed inside for the rest of the day, and {he} "
                     "did not feel brave at all.",
    ("fear", "surprised"): "Who would have thought that something so scary "
                           "could turn out like that?",
    ("argument", "happy"): "{Hero} learned that sharing makes playing more fun.",
    ("argument", "sad"): "{Hero} missed {friend} very much, but {he} did not "
                         "know how to make things right.",
    ("argument", "surprised"): "{Hero} hugged {friend} tight. It was the "
                               "nicest gift {he} had ever gotten.",
}
LESSONS = {
    "happy": (
        "{Hero} learned that a good friend can make any problem smaller.",
        "From that day on, {hero} and {friend} were the best of friends.",
        "{Hero} learned that it is always good to ask for help.",
    ),
    "sad": (
        "{Hero} learned that sometimes things do not turn out the way we hope.",
        "{He} hoped that tomorrow would be a better day.",
        "Some days are just sad days, and that is okay.",
    ),
    "surprised": (
        "{Hero} learned that the world is full of surprises.",
        "From then on, {hero} always said, \"You never know what will happen next!\"",
        "{Hero} would remember that strange and wonderful day forever.",
    ),
}


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

class Slots(dict):
    """Template values; "{Hero}" gives the value of "{hero}" capitalised."""

    def __missing__(self, key: str) -> str:
        # Capitalise on demand: most slots are never used at a sentence start.
        if key[:1].isupper():
            return cap(self[key[0].lower() + key[1:]])
        raise KeyError(key)


def slots(plan: StoryPlan, rng: random.Random) -> Slots:
    hero, friend, place, thing = plan.hero, plan.friend, plan.place, plan.thing
    he, him, his, himself = PRONOUNS[hero.pronoun]
    f_he, f_him, f_his, _ = PRONOUNS[friend.pronoun]
    adult, adult_name, adult_he = plan.adult
    thing_full = f"{plan.thing_adjective} {thing.noun}"
    trait1, trait2 = distinct(rng, TRAITS, 2)
    sight1, sight2 = distinct(rng, place.sights, 2)
    spot1, spot2, spot3 = distinct(rng, place.spots, 3)
    s = Slots({
        "hero": hero.name, "hero_s": possessive(hero.name),
        "hero_intro": hero.intro, "hero_call": hero.call,
        "he": he, "him": him, "his": his, "himself": himself,
        "friend": friend.name, "friend_s": possessive(friend.name),
        "friend_intro": friend.intro, "friend_call": friend.call,
        "f_he": f_he, "f_him": f_him, "f_his": f_his,
        "adult": adult, "adult_name": adult_name, "adult_he": adult_he,
        "place": place.name, "at_place": place.at,
        "sight1": sight1, "sight2": sight2,
        "spot1": spot1, "spot2": spot2, "spot3": spot3,
        "high": rng.choice(place.high), "shelter": rng.choice(place.shelters),
        "thing": thing.noun, "thing_full": thing_full, "a_thing": article(thing_full),
        "broke": thing.broke or "", "fix": thing.fix,
        "activity": plan.activity, "weather": plan.weather, "time": plan.time,
        "trait1": trait1, "trait2": trait2,
        "game": rng.choice(GAMES), "gift": rng.choice(GIFTS),
        "lost_twist": rng.choice(LOST_TWISTS),
    })
    if plan.fear is not None:
        # Fear texts use slots themselves, so fill them first.
        s["fear_intro"] = plan.fear.intro.format_map(s)
        s["fear_gentle"] = plan.fear.gentle.format_map(s)
        s["fear_twist"] = plan.fear.twist.format_map(s)
    return s


def beginning(plan: StoryPlan, s: Slots, rng: random.Random) -> list[str]:
    """Who the hero is, what they like, their friend, and the way to the place."""
    fill = lambda options: rng.choice(options).format_map(s)  # noqa: E731
    lines = []
    if rng.random() < 0.7:
        lines.append(fill(OPENINGS))
        if rng.random() < 0.3:
            lines.append(fill(TRAIT_LINES))
        lines.append(fill(LIKE_LINES))
        lines.append(fill(THING_LINES))
        lines.append(fill(FRIEND_LINES))
        lines.append(fill(GO_LINES))
    else:
        lines.append(fill(ARRIVALS))
        lines.append(fill(ARRIVAL_LINES))
    if rng.random() < 0.35:
        lines.append(fill(SIGHT_LINES))
    if rng.random() < 0.3:
        lines.append(fill(PLAY_LINES))
    return lines


def problem_part(plan: StoryPlan, s: Slots, rng: random.Random) -> list[str]:
    feelings = PROBLEM_FEELINGS[plan.problem]
    n_feelings = rng.choice((1, 1, 2))
    return ([rng.choice(PROBLEM_EVENTS[plan.problem]).format_map(s)]
            + [f.format_map(s) for f in distinct(rng, feelings, n_feelings)])


def attempt_part(plan: StoryPlan, s: Slots, rng: random.Random) -> list[str]:
    return [rng.choice(ATTEMPTS[plan.problem, plan.mood]).format_map(s)]


def ending_part(plan: StoryPlan, s: Slots, rng: random.Random) -> list[str]:
    lines = [rng.choice(ENDINGS_NOW[plan.mood]).format_map(s)]
    if rng.random() < 0.5:
        lines.append(CLOSINGS[plan.problem, plan.mood].format_map(s))
    if rng.random() < 0.5:
        lines.append(rng.choice(ENDINGS_LATER[plan.mood]).format_map(s))
    if rng.random() < 0.3:
        lines.append(rng.choice(LESSONS[plan.mood]).format_map(s))
    return lines


def render(plan: StoryPlan, rng: random.Random) -> str:
    s = slots(plan, rng)
    parts = [
        beginning(plan, s, rng),
        problem_part(plan, s, rng),
        attempt_part(plan, s, rng),
        ending_part(plan, s, rng),
    ]
    # Merge neighbouring parts so the story has plan.n_paragraphs paragraphs.
    breaks = sorted(rng.sample((1, 2, 3), plan.n_paragraphs - 1))
    paragraphs, start = [], 0
    for end in breaks + [4]:
        paragraphs.append(" ".join(line for part in parts[start:end] for line in part))
        start = end
    return "\n".join(paragraphs)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

def _story(seed: int, index: int) -> tuple[str, StoryPlan]:
    # Each story has its own rng, so story i does not depend on n.
    rng = random.Random(seed * 1_000_003 + index)
    plan = make_plan(rng)
    return render(plan, rng), plan


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """n story texts; the same (n, seed) always gives the same list."""
    return [_story(seed, i)[0] for i in range(n)]


def generate_labelled_stories(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (text, mood) pairs, mood in MOODS; texts equal generate_stories(n, seed)."""
    out = []
    for i in range(n):
        text, plan = _story(seed, i)
        out.append((text, plan.mood))
    return out


def story_splits(n_train: int, n_val: int, seed: int = 0) -> dict[str, list[str]]:
    """Train stories are indices 0..n_train-1, validation the next n_val."""
    return {
        "train": [_story(seed, i)[0] for i in range(n_train)],
        "validation": [_story(seed, i)[0] for i in range(n_train, n_train + n_val)],
    }


def labelled_story_splits(n_train: int, n_val: int,
                          seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Like story_splits, with (text, mood) pairs."""
    def pair(i: int) -> tuple[str, str]:
        text, plan = _story(seed, i)
        return text, plan.mood
    return {
        "train": [pair(i) for i in range(n_train)],
        "validation": [pair(i) for i in range(n_train, n_train + n_val)],
    }
