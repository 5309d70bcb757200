"""Where the retailer's customers live and how they can be reached: cities with their ZIP code
prefixes and telephone area codes, street names, and e-mail domains.

Two Portlands and two Springfields are there on purpose: a city name alone does not tell two
addresses apart. E-mail domains are reserved names (RFC 2606 ``.example``, ``example.com``)
so that a demo wired to a real mail server can never write to anybody.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class City:
    """A city, its state, the first three digits of its ZIP codes and its area code."""

    name: str
    state: str
    zip_prefix: str
    area_code: str


CITIES = tuple(
    City(*line.split(","))
    for line in """
Seattle,WA,981,206
Tacoma,WA,984,253
Spokane,WA,992,509
Portland,OR,972,503
Eugene,OR,974,541
Boise,ID,837,208
San Francisco,CA,941,415
Oakland,CA,946,510
San Jose,CA,951,408
Sacramento,CA,958,916
Los Angeles,CA,900,213
San Diego,CA,921,619
Phoenix,AZ,850,602
Tucson,AZ,857,520
Las Vegas,NV,891,702
Salt Lake City,UT,841,801
Denver,CO,802,303
Boulder,CO,803,720
Albuquerque,NM,871,505
Austin,TX,787,512
Dallas,TX,752,214
Houston,TX,770,713
San Antonio,TX,782,210
Oklahoma City,OK,731,405
Kansas City,MO,641,816
St. Louis,MO,631,314
Omaha,NE,681,402
Minneapolis,MN,554,612
Madison,WI,537,608
Milwaukee,WI,532,414
Chicago,IL,606,312
Springfield,IL,627,217
Indianapolis,IN,462,317
Columbus,OH,432,614
Cleveland,OH,441,216
Detroit,MI,482,313
Ann Arbor,MI,481,734
Nashville,TN,372,615
Memphis,TN,381,901
Louisville,KY,402,502
Atlanta,GA,303,404
Charlotte,NC,282,704
Raleigh,NC,276,919
Richmond,VA,232,804
Miami,FL,331,305
Orlando,FL,328,407
Tampa,FL,336,813
New Orleans,LA,701,504
Pittsburgh,PA,152,412
Philadelphia,PA,191,215
Baltimore,MD,212,410
Newark,NJ,071,973
Brooklyn,NY,112,718
Buffalo,NY,142,716
Hartford,CT,061,860
Providence,RI,029,401
Boston,MA,021,617
Cambridge,MA,021,857
Portland,ME,041,207
Burlington,VT,054,802
Springfield,MA,011,413
""".strip().splitlines()
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


STREETS = _words(
    """
    Maple Oak Cedar Pine Elm Washington Lake Hill Park Main Church Highland Sunset Ridge River
    Walnut Chestnut Spring Meadow Forest Lincoln Jefferson Madison Franklin Jackson Adams Cherry
    Willow Birch Aspen Magnolia Dogwood Hickory Sycamore Laurel Poplar Juniper Spruce Orchard
    Valley Prospect Union Market Center Mill School Broad Water Bridge Railroad Harbor Bay Ocean
    Summit Grove Brook Fairview Riverside Lakeview Hillcrest Woodland Pleasant Liberty Cottage
    """
)

STREET_SUFFIXES = (
    ("Street", "St"),
    ("Avenue", "Ave"),
    ("Road", "Rd"),
    ("Lane", "Ln"),
    ("Drive", "Dr"),
    ("Court", "Ct"),
    ("Place", "Pl"),
    ("Boulevard", "Blvd"),
    ("Way", "Way"),
    ("Terrace", "Ter"),
)
"""Street types as people write them in full, and as a clerk abbreviates them."""

EMAIL_DOMAINS = (
    "mail.example",
    "inbox.example",
    "post.example",
    "webmail.example",
    "example.com",
    "example.net",
    "example.org",
    "home.example",
)
"""Personal e-mail domains, the most used first."""
