"""CHAIR's vocabulary: the 80 COCO classes with their synonyms, and the two-word phrases CHAIR reads as one word.

Both tables are OPERA's `chair.py` (shikiw/OPERA, HEAD 61426ef) unchanged, whose synonym list is
LisaAnne/Hallucination's `data/synonyms.txt`. They are kept byte for byte, quirks included, because CHAIR numbers
are only comparable when the word lists are identical:
- "scooter,  motor bike" and "cake,  cheesecake" have a double space, so the synonyms parse as " motor bike" and
  " cheesecake" (leading space) and can never match: "motor bike" and "cheesecake" are not counted as objects.
- the text starts with a newline, which gives an empty first line and the harmless entry '' -> ''.
- "iPhone" has a capital letter and captions are lower-cased, so it never matches.
- the cow and couch lines end with a space, which parsing strips.
- "hot dog" and "teddy bear" appear twice in the double-word list (harmless).
"""

# OPERA's `synonyms_txt`, verbatim: one COCO class per line, its name ("node word") first, then its synonyms.
SYNONYMS_TXT = '''
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison 
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield 
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
'''


def parse_synonyms(text: str) -> dict[str, str]:
    """Every synonym -> the COCO class it names (its line's first item), parsed exactly as OPERA parses the text.
    A word listed on two lines maps to the later line's class, as in OPERA's loop (no word in the list does)."""
    inverse = {}
    for line in text.splitlines():
        items = line.strip().split(", ")
        for item in items:
            inverse[item] = items[0]
    return inverse


# synonym -> COCO class (node word). Its keys are OPERA's `mscoco_objects`: a caption word counts as an object
# mention iff it is one of them.
OBJECT_WORDS = parse_synonyms(SYNONYMS_TXT)

# Two-word phrases (on lemmas) that CHAIR merges into one word before looking words up. Most stay as they are
# ("fire hydrant"); the qualifier rules map "baby bird" / "adult cow" to the animal and "passenger jet" to the
# vehicle, so that "baby" and "passenger" (synonyms of person) do not fire for "person"; "toilet seat" becomes
# "toilet" (not a "chair"), "bow tie" becomes "tie", and "wine glas" (the lemmatizer's form of "wine glass")
# becomes "wine glass". "home plate" and "train track" are merged only so that "plate"/"train" do not count.
_COCO_DOUBLE_WORDS = ["motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
                      "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
                      "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
                      "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
                      "stove top oven", "hot dog", "teddy bear", "home plate", "train track"]
_ANIMAL_WORDS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"]
_VEHICLE_WORDS = ["jet", "train"]


def double_word_table() -> dict[str, str]:
    """"first second" -> the one word CHAIR reads instead, built in OPERA's order (later rules win)."""
    table = {phrase: phrase for phrase in _COCO_DOUBLE_WORDS}
    for animal in _ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in _VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"
    return table


DOUBLE_WORDS = double_word_table()
