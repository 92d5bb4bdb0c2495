"""Class names of the 11 MTIL datasets, as data: CoOp's lists (the names DIKI and CoOp prompt CLIP with).

Each list is in the dataset's native label order (the order of CoOp's ``split_zhou_*.json`` labels).
Loaders match the names they find on disk (split files, torchvision's ``classes``, folder names) to
these lists by :func:`name_key`, so a label always means the class its prompt names.

Where a name comes from a folder or a metadata file, the raw form is kept here and CoOp's rule is
applied below: Stanford Cars moves the model year to the front ("2012 Audi S4 Sedan"), SUN397 puts
the qualifier first ("a/apartment_building/outdoor" -> "outdoor apartment building"), underscores
become spaces.
"""

from __future__ import annotations

import re


def _lines(block: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in block.strip().splitlines() if line.strip())


def name_key(name: str) -> tuple[str, ...]:
    """Order-free, case-free, punctuation-free key of a class name.

    "2012 Audi S4 Sedan" (CoOp), "Audi S4 Sedan 2012" (the Stanford Cars devkit), "apartment_building/outdoor"
    (torchvision's SUN397) and "outdoor apartment building" (CoOp) map to the same key as their counterparts.
    """
    return tuple(sorted(re.findall(r"[a-z0-9]+", name.lower())))


def _clean(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


AIRCRAFT = _lines(
    """
707-320
727-200
737-200
737-300
737-400
737-500
737-600
737-700
737-800
737-900
747-100
747-200
747-300
747-400
757-200
757-300
767-200
767-300
767-400
777-200
777-300
A300B4
A310
A318
A319
A320
A321
A330-200
A330-300
A340-200
A340-300
A340-500
A340-600
A380
ATR-42
ATR-72
An-12
BAE 146-200
BAE 146-300
BAE-125
Beechcraft 1900
Boeing 717
C-130
C-47
CRJ-200
CRJ-700
CRJ-900
Cessna 172
Cessna 208
Cessna 525
Cessna 560
Challenger 600
DC-10
DC-3
DC-6
DC-8
DC-9-30
DH-82
DHC-1
DHC-6
DHC-8-100
DHC-8-300
DR-400
Dornier 328
E-170
E-190
E-195
EMB-120
ERJ 135
ERJ 145
Embraer Legacy 600
Eurofighter Typhoon
F-16A/B
F/A-18
Falcon 2000
Falcon 900
Fokker 100
Fokker 50
Fokker 70
Global Express
Gulfstream IV
Gulfstream V
Hawk T1
Il-76
L-1011
MD-11
MD-80
MD-87
MD-90
Metroliner
Model B200
PA-28
SR-20
Saab 2000
Saab 340
Spitfire
Tornado
Tu-134
Tu-154
Yak-42
"""
)

# Folders of 101_ObjectCategories, sorted, without BACKGROUND_Google and Faces_easy; four renamed (below).
CALTECH101 = _lines(
    """
face
leopard
motorbike
accordion
airplane
anchor
ant
barrel
bass
beaver
binocular
bonsai
brain
brontosaurus
buddha
butterfly
camera
cannon
car side
ceiling fan
cellphone
chair
chandelier
cougar body
cougar face
crab
crayfish
crocodile
crocodile head
cup
dalmatian
dollar bill
dolphin
dragonfly
electric guitar
elephant
emu
euphonium
ewer
ferry
flamingo
flamingo head
garfield
gerenuk
gramophone
grand piano
hawksbill
headphone
hedgehog
helicopter
ibis
inline skate
joshua tree
kangaroo
ketch
lamp
laptop
llama
lobster
lotus
mandolin
mayfly
menorah
metronome
minaret
nautilus
octopus
okapi
pagoda
panda
pigeon
pizza
platypus
pyramid
revolver
rhino
rooster
saxophone
schooner
scissors
scorpion
sea horse
snoopy
soccer ball
stapler
starfish
stegosaurus
stop sign
strawberry
sunflower
tick
trilobite
umbrella
watch
water lilly
wheelchair
wild cat
windsor chair
wrench
yin yang
"""
)
CALTECH101_FOLDER_NAMES = {"Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike", "airplanes": "airplane"}
CALTECH101_IGNORED_FOLDERS = ("BACKGROUND_Google", "Faces_easy")

CIFAR100 = _lines(
    """
apple
aquarium fish
baby
bear
beaver
bed
bee
beetle
bicycle
bottle
bowl
boy
bridge
bus
butterfly
camel
can
castle
caterpillar
cattle
chair
chimpanzee
clock
cloud
cockroach
couch
crab
crocodile
cup
dinosaur
dolphin
elephant
flatfish
forest
fox
girl
hamster
house
kangaroo
keyboard
lamp
lawn mower
leopard
lion
lizard
lobster
man
maple tree
motorcycle
mountain
mouse
mushroom
oak tree
orange
orchid
otter
palm tree
pear
pickup truck
pine tree
plain
plate
poppy
porcupine
possum
rabbit
raccoon
ray
road
rocket
rose
sea
seal
shark
shrew
skunk
skyscraper
snail
snake
spider
squirrel
streetcar
sunflower
sweet pepper
table
tank
telephone
television
tiger
tractor
train
trout
tulip
turtle
wardrobe
whale
willow tree
wolf
woman
worm
"""
)

DTD = _lines(
    """
banded
blotchy
braided
bubbly
bumpy
chequered
cobwebbed
cracked
crosshatched
crystalline
dotted
fibrous
flecked
freckled
frilly
gauzy
grid
grooved
honeycombed
interlaced
knitted
lacelike
lined
marbled
matted
meshed
paisley
perforated
pitted
pleated
polka-dotted
porous
potholed
scaly
smeared
spiralled
sprinkled
stained
stratified
striped
studded
swirly
veined
waffled
woven
wrinkled
zigzagged
"""
)

# Folder of 2750/ -> CoOp's readable name, in the folders' sorted order.
EUROSAT_FOLDER_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
EUROSAT = tuple(EUROSAT_FOLDER_NAMES.values())

# cat_to_name.json of Oxford Flowers 102 (label 1..102), the names CoOp and torchvision use.
FLOWERS = _lines(
    """
pink primrose
hard-leaved pocket orchid
canterbury bells
sweet pea
english marigold
tiger lily
moon orchid
bird of paradise
monkshood
globe thistle
snapdragon
colt's foot
king protea
spear thistle
yellow iris
globe-flower
purple coneflower
peruvian lily
balloon flower
giant white arum lily
fire lily
pincushion flower
fritillary
red ginger
grape hyacinth
corn poppy
prince of wales feathers
stemless gentian
artichoke
sweet william
carnation
garden phlox
love in the mist
mexican aster
alpine sea holly
ruby-lipped cattleya
cape flower
great masterwort
siam tulip
lenten rose
barbeton daisy
daffodil
sword lily
poinsettia
bolero deep blue
wallflower
marigold
buttercup
oxeye daisy
common dandelion
petunia
wild pansy
primula
sunflower
pelargonium
bishop of llandaff
gaura
geranium
orange dahlia
pink-yellow dahlia?
cautleya spicata
japanese anemone
black-eyed susan
silverbush
californian poppy
osteospermum
spring crocus
bearded iris
windflower
tree poppy
gazania
azalea
water lily
rose
thorn apple
morning glory
passion flower
lotus
toad lily
anthurium
frangipani
clematis
hibiscus
columbine
desert-rose
tree mallow
magnolia
cyclamen
watercress
canna lily
hippeastrum
bee balm
ball moss
foxglove
bougainvillea
camellia
mallow
mexican petunia
bromelia
blanket flower
trumpet creeper
blackberry lily
"""
)

FOOD = _lines(
    """
apple pie
baby back ribs
baklava
beef carpaccio
beef tartare
beet salad
beignets
bibimbap
bread pudding
breakfast burrito
bruschetta
caesar salad
cannoli
caprese salad
carrot cake
ceviche
cheese plate
cheesecake
chicken curry
chicken quesadilla
chicken wings
chocolate cake
chocolate mousse
churros
clam chowder
club sandwich
crab cakes
creme brulee
croque madame
cup cakes
deviled eggs
donuts
dumplings
edamame
eggs benedict
escargots
falafel
filet mignon
fish and chips
foie gras
french fries
french onion soup
french toast
fried calamari
fried rice
frozen yogurt
garlic bread
gnocchi
greek salad
grilled cheese sandwich
grilled salmon
guacamole
gyoza
hamburger
hot and sour soup
hot dog
huevos rancheros
hummus
ice cream
lasagna
lobster bisque
lobster roll sandwich
macaroni and cheese
macarons
miso soup
mussels
nachos
omelette
onion rings
oysters
pad thai
paella
pancakes
panna cotta
peking duck
pho
pizza
pork chop
poutine
prime rib
pulled pork sandwich
ramen
ravioli
red velvet cake
risotto
samosa
sashimi
scallops
seaweed salad
shrimp and grits
spaghetti bolognese
spaghetti carbonara
spring rolls
steak
strawberry shortcake
sushi
tacos
takoyaki
tiramisu
tuna tartare
waffles
"""
)

# The names DIKI's code uses (torchvision's MNIST.classes), not CLIP's bare digits.
MNIST = (
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
)

# Class ids 1..37 of the Oxford-IIIT Pet annotations, breeds lower-cased as CoOp does.
OXFORD_PET = _lines(
    """
abyssinian
american bulldog
american pit bull terrier
basset hound
beagle
bengal
birman
bombay
boxer
british shorthair
chihuahua
egyptian mau
english cocker spaniel
english setter
german shorthaired
great pyrenees
havanese
japanese chin
keeshond
leonberger
maine coon
miniature pinscher
newfoundland
persian
pomeranian
pug
ragdoll
russian blue
saint bernard
samoyed
scottish terrier
shiba inu
siamese
sphynx
staffordshire bull terrier
wheaten terrier
yorkshire terrier
"""
)

# devkit/cars_meta.mat class_names, in label order (1..196).
STANFORD_CARS_META = _lines(
    """
AM General Hummer SUV 2000
Acura RL Sedan 2012
Acura TL Sedan 2012
Acura TL Type-S 2008
Acura TSX Sedan 2012
Acura Integra Type R 2001
Acura ZDX Hatchback 2012
Aston Martin V8 Vantage Convertible 2012
Aston Martin V8 Vantage Coupe 2012
Aston Martin Virage Convertible 2012
Aston Martin Virage Coupe 2012
Audi RS 4 Convertible 2008
Audi A5 Coupe 2012
Audi TTS Coupe 2012
Audi R8 Coupe 2012
Audi V8 Sedan 1994
Audi 100 Sedan 1994
Audi 100 Wagon 1994
Audi TT Hatchback 2011
Audi S6 Sedan 2011
Audi S5 Convertible 2012
Audi S5 Coupe 2012
Audi S4 Sedan 2012
Audi S4 Sedan 2007
Audi TT RS Coupe 2012
BMW ActiveHybrid 5 Sedan 2012
BMW 1 Series Convertible 2012
BMW 1 Series Coupe 2012
BMW 3 Series Sedan 2012
BMW 3 Series Wagon 2012
BMW 6 Series Convertible 2007
BMW X5 SUV 2007
BMW X6 SUV 2012
BMW M3 Coupe 2012
BMW M5 Sedan 2010
BMW M6 Convertible 2010
BMW X3 SUV 2012
BMW Z4 Convertible 2012
Bentley Continental Supersports Conv. Convertible 2012
Bentley Arnage Sedan 2009
Bentley Mulsanne Sedan 2011
Bentley Continental GT Coupe 2012
Bentley Continental GT Coupe 2007
Bentley Continental Flying Spur Sedan 2007
Bugatti Veyron 16.4 Convertible 2009
Bugatti Veyron 16.4 Coupe 2009
Buick Regal GS 2012
Buick Rainier SUV 2007
Buick Verano Sedan 2012
Buick Enclave SUV 2012
Cadillac CTS-V Sedan 2012
Cadillac SRX SUV 2012
Cadillac Escalade EXT Crew Cab 2007
Chevrolet Silverado 1500 Hybrid Crew Cab 2012
Chevrolet Corvette Convertible 2012
Chevrolet Corvette ZR1 2012
Chevrolet Corvette Ron Fellows Edition Z06 2007
Chevrolet Traverse SUV 2012
Chevrolet Camaro Convertible 2012
Chevrolet HHR SS 2010
Chevrolet Impala Sedan 2007
Chevrolet Tahoe Hybrid SUV 2012
Chevrolet Sonic Sedan 2012
Chevrolet Express Cargo Van 2007
Chevrolet Avalanche Crew Cab 2012
Chevrolet Cobalt SS 2010
Chevrolet Malibu Hybrid Sedan 2010
Chevrolet TrailBlazer SS 2009
Chevrolet Silverado 2500HD Regular Cab 2012
Chevrolet Silverado 1500 Classic Extended Cab 2007
Chevrolet Express Van 2007
Chevrolet Monte Carlo Coupe 2007
Chevrolet Malibu Sedan 2007
Chevrolet Silverado 1500 Extended Cab 2012
Chevrolet Silverado 1500 Regular Cab 2012
Chrysler Aspen SUV 2009
Chrysler Sebring Convertible 2010
Chrysler Town and Country Minivan 2012
Chrysler 300 SRT-8 2010
Chrysler Crossfire Convertible 2008
Chrysler PT Cruiser Convertible 2008
Daewoo Nubira Wagon 2002
Dodge Caliber Wagon 2012
Dodge Caliber Wagon 2007
Dodge Caravan Minivan 1997
Dodge Ram Pickup 3500 Crew Cab 2010
Dodge Ram Pickup 3500 Quad Cab 2009
Dodge Sprinter Cargo Van 2009
Dodge Journey SUV 2012
Dodge Dakota Crew Cab 2010
Dodge Dakota Club Cab 2007
Dodge Magnum Wagon 2008
Dodge Challenger SRT8 2011
Dodge Durango SUV 2012
Dodge Durango SUV 2007
Dodge Charger Sedan 2012
Dodge Charger SRT-8 2009
Eagle Talon Hatchback 1998
FIAT 500 Abarth 2012
FIAT 500 Convertible 2012
Ferrari FF Coupe 2012
Ferrari California Convertible 2012
Ferrari 458 Italia Convertible 2012
Ferrari 458 Italia Coupe 2012
Fisker Karma Sedan 2012
Ford F-450 Super Duty Crew Cab 2012
Ford Mustang Convertible 2007
Ford Freestar Minivan 2007
Ford Expedition EL SUV 2009
Ford Edge SUV 2012
Ford Ranger SuperCab 2011
Ford GT Coupe 2006
Ford F-150 Regular Cab 2012
Ford F-150 Regular Cab 2007
Ford Focus Sedan 2007
Ford E-Series Wagon Van 2012
Ford Fiesta Sedan 2012
GMC Terrain SUV 2012
GMC Savana Van 2012
GMC Yukon Hybrid SUV 2012
GMC Acadia SUV 2012
GMC Canyon Extended Cab 2012
Geo Metro Convertible 1993
HUMMER H3T Crew Cab 2010
HUMMER H2 SUT Crew Cab 2009
Honda Odyssey Minivan 2012
Honda Odyssey Minivan 2007
Honda Accord Coupe 2012
Honda Accord Sedan 2012
Hyundai Veloster Hatchback 2012
Hyundai Santa Fe SUV 2012
Hyundai Tucson SUV 2012
Hyundai Veracruz SUV 2012
Hyundai Sonata Hybrid Sedan 2012
Hyundai Elantra Sedan 2007
Hyundai Accent Sedan 2012
Hyundai Genesis Sedan 2012
Hyundai Sonata Sedan 2012
Hyundai Elantra Touring Hatchback 2012
Hyundai Azera Sedan 2012
Infiniti G Coupe IPL 2012
Infiniti QX56 SUV 2011
Isuzu Ascender SUV 2008
Jaguar XK XKR 2012
Jeep Patriot SUV 2012
Jeep Wrangler SUV 2012
Jeep Liberty SUV 2012
Jeep Grand Cherokee SUV 2012
Jeep Compass SUV 2012
Lamborghini Reventon Coupe 2008
Lamborghini Aventador Coupe 2012
Lamborghini Gallardo LP 570-4 Superleggera 2012
Lamborghini Diablo Coupe 2001
Land Rover Range Rover SUV 2012
Land Rover LR2 SUV 2012
Lincoln Town Car Sedan 2011
MINI Cooper Roadster Convertible 2012
Maybach Landaulet Convertible 2012
Mazda Tribute SUV 2011
McLaren MP4-12C Coupe 2012
Mercedes-Benz 300-Class Convertible 1993
Mercedes-Benz C-Class Sedan 2012
Mercedes-Benz SL-Class Coupe 2009
Mercedes-Benz E-Class Sedan 2012
Mercedes-Benz S-Class Sedan 2012
Mercedes-Benz Sprinter Van 2012
Mitsubishi Lancer Sedan 2012
Nissan Leaf Hatchback 2012
Nissan NV Passenger Van 2012
Nissan Juke Hatchback 2012
Nissan 240SX Coupe 1998
Plymouth Neon Coupe 1999
Porsche Panamera Sedan 2012
Ram C/V Cargo Van Minivan 2012
Rolls-Royce Phantom Drophead Coupe Convertible 2012
Rolls-Royce Ghost Sedan 2012
Rolls-Royce Phantom Sedan 2012
Scion xD Hatchback 2012
Spyker C8 Convertible 2009
Spyker C8 Coupe 2009
Suzuki Aerio Sedan 2007
Suzuki Kizashi Sedan 2012
Suzuki SX4 Hatchback 2012
Suzuki SX4 Sedan 2012
Tesla Model S Sedan 2012
Toyota Sequoia SUV 2012
Toyota Camry Sedan 2012
Toyota Corolla Sedan 2012
Toyota 4Runner SUV 2012
Volkswagen Golf Hatchback 2012
Volkswagen Golf Hatchback 1991
Volkswagen Beetle Hatchback 2012
Volvo C30 Hatchback 2012
Volvo 240 Sedan 1993
Volvo XC90 SUV 2007
smart fortwo Convertible 2012
"""
)
STANFORD_CARS = tuple(" ".join([n.split()[-1], *n.split()[:-1]]) for n in STANFORD_CARS_META)

# ClassName.txt of SUN397 (without the leading "/"), in label order.
SUN397_PATHS = _lines(
    """
a/abbey
a/airplane_cabin
a/airport_terminal
a/alley
a/amphitheater
a/amusement_arcade
a/amusement_park
a/anechoic_chamber
a/apartment_building/outdoor
a/apse/indoor
a/aquarium
a/aqueduct
a/arch
a/archive
a/arrival_gate/outdoor
a/art_gallery
a/art_school
a/art_studio
a/assembly_line
a/athletic_field/outdoor
a/atrium/public
a/attic
a/auditorium
a/auto_factory
b/badlands
b/badminton_court/indoor
b/baggage_claim
b/bakery/shop
b/balcony/exterior
b/balcony/interior
b/ball_pit
b/ballroom
b/bamboo_forest
b/banquet_hall
b/bar
b/barn
b/barndoor
b/baseball_field
b/basement
b/basilica
b/basketball_court/outdoor
b/bathroom
b/batters_box
b/bayou
b/bazaar/indoor
b/bazaar/outdoor
b/beach
b/beauty_salon
b/bedroom
b/berth
b/biology_laboratory
b/bistro/indoor
b/boardwalk
b/boat_deck
b/boathouse
b/bookstore
b/booth/indoor
b/botanical_garden
b/bow_window/indoor
b/bow_window/outdoor
b/bowling_alley
b/boxing_ring
b/brewery/indoor
b/bridge
b/building_facade
b/bullring
b/burial_chamber
b/bus_interior
b/butchers_shop
b/butte
c/cabin/outdoor
c/cafeteria
c/campsite
c/campus
c/canal/natural
c/canal/urban
c/candy_store
c/canyon
c/car_interior/backseat
c/car_interior/frontseat
c/carrousel
c/casino/indoor
c/castle
c/catacomb
c/cathedral/indoor
c/cathedral/outdoor
c/cavern/indoor
c/cemetery
c/chalet
c/cheese_factory
c/chemistry_lab
c/chicken_coop/indoor
c/chicken_coop/outdoor
c/childs_room
c/church/indoor
c/church/outdoor
c/classroom
c/clean_room
c/cliff
c/cloister/indoor
c/closet
c/clothing_store
c/coast
c/cockpit
c/coffee_shop
c/computer_room
c/conference_center
c/conference_room
c/construction_site
c/control_room
c/control_tower/outdoor
c/corn_field
c/corral
c/corridor
c/cottage_garden
c/courthouse
c/courtroom
c/courtyard
c/covered_bridge/exterior
c/creek
c/crevasse
c/crosswalk
c/cubicle/office
d/dam
d/delicatessen
d/dentists_office
d/desert/sand
d/desert/vegetation
d/diner/indoor
d/diner/outdoor
d/dinette/home
d/dinette/vehicle
d/dining_car
d/dining_room
d/discotheque
d/dock
d/doorway/outdoor
d/dorm_room
d/driveway
d/driving_range/outdoor
d/drugstore
e/electrical_substation
e/elevator/door
e/elevator/interior
e/elevator_shaft
e/engine_room
e/escalator/indoor
e/excavation
f/factory/indoor
f/fairway
f/fastfood_restaurant
f/field/cultivated
f/field/wild
f/fire_escape
f/fire_station
f/firing_range/indoor
f/fishpond
f/florist_shop/indoor
f/food_court
f/forest/broadleaf
f/forest/needleleaf
f/forest_path
f/forest_road
f/formal_garden
f/fountain
g/galley
g/game_room
g/garage/indoor
g/garbage_dump
g/gas_station
g/gazebo/exterior
g/general_store/indoor
g/general_store/outdoor
g/gift_shop
g/golf_course
g/greenhouse/indoor
g/greenhouse/outdoor
g/gymnasium/indoor
h/hangar/indoor
h/hangar/outdoor
h/harbor
h/hayfield
h/heliport
h/herb_garden
h/highway
h/hill
h/home_office
h/hospital
h/hospital_room
h/hot_spring
h/hot_tub/outdoor
h/hotel/outdoor
h/hotel_room
h/house
h/hunting_lodge/outdoor
i/ice_cream_parlor
i/ice_floe
i/ice_shelf
i/ice_skating_rink/indoor
i/ice_skating_rink/outdoor
i/iceberg
i/igloo
i/industrial_area
i/inn/outdoor
i/islet
j/jacuzzi/indoor
j/jail/indoor
j/jail_cell
j/jewelry_shop
k/kasbah
k/kennel/indoor
k/kennel/outdoor
k/kindergarden_classroom
k/kitchen
k/kitchenette
l/labyrinth/outdoor
l/lake/natural
l/landfill
l/landing_deck
l/laundromat
l/lecture_room
l/library/indoor
l/library/outdoor
l/lido_deck/outdoor
l/lift_bridge
l/lighthouse
l/limousine_interior
l/living_room
l/lobby
l/lock_chamber
l/locker_room
m/mansion
m/manufactured_home
m/market/indoor
m/market/outdoor
m/marsh
m/martial_arts_gym
m/mausoleum
m/medina
m/moat/water
m/monastery/outdoor
m/mosque/indoor
m/mosque/outdoor
m/motel
m/mountain
m/mountain_snowy
m/movie_theater/indoor
m/museum/indoor
m/music_store
m/music_studio
n/nuclear_power_plant/outdoor
n/nursery
o/oast_house
o/observatory/outdoor
o/ocean
o/office
o/office_building
o/oil_refinery/outdoor
o/oilrig
o/operating_room
o/orchard
o/outhouse/outdoor
p/pagoda
p/palace
p/pantry
p/park
p/parking_garage/indoor
p/parking_garage/outdoor
p/parking_lot
p/parlor
p/pasture
p/patio
p/pavilion
p/pharmacy
p/phone_booth
p/physics_laboratory
p/picnic_area
p/pilothouse/indoor
p/planetarium/outdoor
p/playground
p/playroom
p/plaza
p/podium/indoor
p/podium/outdoor
p/pond
p/poolroom/establishment
p/poolroom/home
p/power_plant/outdoor
p/promenade_deck
p/pub/indoor
p/pulpit
p/putting_green
r/racecourse
r/raceway
r/raft
r/railroad_track
r/rainforest
r/reception
r/recreation_room
r/residential_neighborhood
r/restaurant
r/restaurant_kitchen
r/restaurant_patio
r/rice_paddy
r/riding_arena
r/river
r/rock_arch
r/rope_bridge
r/ruin
r/runway
s/sandbar
s/sandbox
s/sauna
s/schoolhouse
s/sea_cliff
s/server_room
s/shed
s/shoe_shop
s/shopfront
s/shopping_mall/indoor
s/shower
s/skatepark
s/ski_lodge
s/ski_resort
s/ski_slope
s/sky
s/skyscraper
s/slum
s/snowfield
s/squash_court
s/stable
s/stadium/baseball
s/stadium/football
s/stage/indoor
s/staircase
s/street
s/subway_interior
s/subway_station/platform
s/supermarket
s/sushi_bar
s/swamp
s/swimming_pool/indoor
s/swimming_pool/outdoor
s/synagogue/indoor
s/synagogue/outdoor
t/television_studio
t/temple/east_asia
t/temple/south_asia
t/tennis_court/indoor
t/tennis_court/outdoor
t/tent/outdoor
t/theater/indoor_procenium
t/theater/indoor_seats
t/thriftshop
t/throne_room
t/ticket_booth
t/toll_plaza
t/topiary_garden
t/tower
t/toyshop
t/track/outdoor
t/train_railway
t/train_station/platform
t/tree_farm
t/tree_house
t/trench
u/underwater/coral_reef
u/utility_room
v/valley
v/van_interior
v/vegetable_garden
v/veranda
v/veterinarians_office
v/viaduct
v/videostore
v/village
v/vineyard
v/volcano
v/volleyball_court/indoor
v/volleyball_court/outdoor
w/waiting_room
w/warehouse/indoor
w/water_tower
w/waterfall/block
w/waterfall/fan
w/waterfall/plunge
w/watering_hole
w/wave
w/wet_bar
w/wheat_field
w/wind_farm
w/windmill
w/wine_cellar/barrel_storage
w/wine_cellar/bottle_storage
w/wrestling_ring/indoor
y/yard
y/youth_hostel
"""
)
SUN397 = tuple(_clean(" ".join(reversed(p.split("/")[1:]))) for p in SUN397_PATHS)

CLASSNAMES: dict[str, tuple[str, ...]] = {
    "Aircraft": AIRCRAFT,
    "Caltech101": CALTECH101,
    "CIFAR100": CIFAR100,
    "DTD": DTD,
    "EuroSAT": EUROSAT,
    "Flowers": FLOWERS,
    "Food": FOOD,
    "MNIST": MNIST,
    "OxfordPet": OXFORD_PET,
    "StanfordCars": STANFORD_CARS,
    "SUN397": SUN397,
}
