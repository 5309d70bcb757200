"""Given names with the short forms people go by, and family names, most common first.

Matching has to see that ``Bob`` is ``Robert`` and that ``Sally`` may be ``Sarah``: the forms
here are written from how people are called, not copied from the matcher's nickname table, so
some of them are ones the matcher does not know (as in real data). The lists are ordered by
rough popularity; :func:`popularity` weights them so that a few names are common and many rare
(the most common family name is about 1.5 % of people, as Smith is in the US within a factor of
two), which gives term-frequency adjustments something to adjust.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class GivenName:
    """A formal given name and the short forms of it that people go by."""

    name: str
    nicknames: tuple[str, ...]


def _parse(lines: str) -> tuple[GivenName, ...]:
    """``"Robert: Bob Rob"`` lines as names; a name without a colon has no short forms."""
    names = []
    for line in lines.strip().splitlines():
        formal, _, short = line.partition(":")
        names.append(GivenName(formal.strip(), tuple(short.split())))
    return tuple(names)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


MALE = _parse(
    """
    James: Jim Jimmy Jamie
    John: Jack Johnny
    Robert: Bob Rob Bobby Robbie
    Michael: Mike Mikey
    William: Bill Will Billy Liam
    David: Dave Davey
    Richard: Rick Rich Richie Dick
    Joseph: Joe Joey
    Thomas: Tom Tommy
    Charles: Charlie Chuck
    Christopher: Chris Topher
    Daniel: Dan Danny
    Matthew: Matt
    Anthony: Tony
    Mark
    Donald: Don Donnie
    Steven: Steve
    Paul
    Andrew: Andy Drew
    Joshua: Josh
    Kenneth: Ken Kenny
    Kevin
    Brian
    George
    Timothy: Tim Timmy
    Ronald: Ron Ronnie
    Edward: Ed Eddie Ted
    Jason
    Jeffrey: Jeff
    Ryan
    Jacob: Jake
    Gary
    Nicholas: Nick Nicky
    Eric
    Jonathan: Jon Jonny
    Stephen: Steve
    Justin
    Scott
    Brandon
    Benjamin: Ben Benny
    Samuel: Sam Sammy
    Gregory: Greg
    Alexander: Alex Xander
    Francis: Frank
    Patrick: Pat Paddy
    Raymond: Ray
    Dennis
    Tyler
    Aaron
    Jose: Pepe
    Adam
    Nathan: Nate
    Henry: Hank Harry
    Douglas: Doug
    Zachary: Zach
    Peter: Pete
    Kyle
    Walter: Walt
    Ethan
    Jeremy
    Harold: Hal Harry
    Keith
    Christian
    Roger
    Noah
    Gerald: Gerry Jerry
    Carl
    Terrence: Terry
    Sean
    Austin
    Arthur: Art Artie
    Lawrence: Larry
    Jesse
    Dylan
    Bruce
    Albert: Al Bert
    Gabriel: Gabe
    Logan
    Alan: Al
    Juan
    Wayne
    Roy
    Ralph
    Randall: Randy
    Eugene: Gene
    Vincent: Vince Vinny
    Russell: Russ
    Elijah: Eli
    Louis: Lou
    Philip: Phil
    Frederick: Fred Freddie
    Leonard: Len Lenny Leo
    Theodore: Ted Teddy Theo
    Mohammed
    Hiroshi
    Wei
    Rahul
    Kwame
    """
)
FEMALE = _parse(
    """
    Mary: Molly Mae
    Patricia: Pat Patty Trish
    Jennifer: Jen Jenny
    Linda
    Elizabeth: Liz Beth Betty Lizzie Eliza
    Barbara: Barb Babs
    Susan: Sue Susie
    Jessica: Jess Jessie
    Sarah: Sally
    Karen
    Lisa
    Nancy
    Margaret: Maggie Peggy Meg
    Sandra: Sandy
    Ashley
    Kimberly: Kim
    Emily: Em Emmy
    Donna
    Michelle: Shelly
    Carol
    Amanda: Mandy
    Dorothy: Dot Dottie
    Melissa: Mel Missy
    Deborah: Deb Debbie
    Stephanie: Steph
    Rebecca: Becky Becca
    Sharon
    Laura
    Cynthia: Cindy
    Kathleen: Kathy Kate
    Amy
    Angela: Angie
    Shirley
    Anna: Annie
    Brenda
    Pamela: Pam
    Emma
    Nicole: Nikki
    Helen: Nell
    Samantha: Sam Sammy
    Katherine: Kate Katie Kathy Kat
    Christine: Chris Chrissy Tina
    Rachel
    Carolyn: Carrie
    Janet: Jan
    Catherine: Cathy Cat Kate
    Maria
    Heather
    Diane
    Ruth: Ruthie
    Julie
    Olivia: Liv Livvy
    Joyce
    Virginia: Ginny
    Victoria: Vicky Tori
    Kelly
    Lauren
    Christina: Tina Chris
    Joan: Joanie
    Evelyn: Evie
    Judith: Judy
    Megan: Meg
    Andrea: Andi
    Cheryl
    Hannah
    Jacqueline: Jackie
    Martha: Marty
    Gloria
    Teresa: Terry Tess
    Ann: Annie
    Madison: Maddie
    Frances: Fran Frankie
    Kathryn: Kate Katie
    Janice: Jan
    Jean
    Abigail: Abby Gail
    Alice: Ally
    Sophia: Sophie
    Grace: Gracie
    Denise
    Amber
    Doris
    Marilyn
    Danielle: Dani
    Beverly: Bev
    Isabella: Bella Izzy
    Diana: Di
    Natalie: Nat
    Brittany
    Charlotte: Charlie Lottie
    Marie
    Kayla
    Alexis: Lexi
    Priya
    Mei
    Yuki
    Amara
    Fatima
    """
)

COMMON_SURNAMES = (
    *_words(
        """
    Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez
    Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris
    Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill
    Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips
    Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers
    Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson
    Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo
    Sanders Patel Myers Long Ross Foster Jimenez Powell Jenkins Perry Russell Sullivan Bell
    Coleman Butler Henderson Barnes Gonzales Fisher Vasquez Simmons Romero Jordan Patterson
    Alexander Hamilton Graham Reynolds Griffin Wallace Moreno West Cole Hayes Bryant Herrera
    Gibson Ellis Tran Medina Aguilar Stevens Murray Ford Castro Marshall Owens Harrison Fernandez
    McDonald Woods Washington Kennedy Wells Vargas Henry Chen Freeman Webb Tucker Guzman Burns
    Crawford Olson Simpson Porter Hunter Gordon Mendez Silva Shaw Snyder Mason Dixon Munoz Hunt
    Hicks Holmes Palmer Wagner Black Robertson Boyd Rose Stone Salazar Fox Warren Mills Meyer
    Rice Schmidt Garza Daniels Ferguson Nichols Stephens Soto Weaver Ryan Gardner Payne Grant
    Dunn Kelley Spencer Hawkins Arnold Pierce Vazquez Hansen Peters Santos Hart Bradley Knight
    Elliott Cunningham Duncan Armstrong Hudson Carroll Lane Riley Andrews Alvarado Ray Delgado
    Berry Perkins Hoffman Johnston Matthews Pena Richards Contreras Willis Carpenter Lawrence
    Sandoval O'Brien O'Connor McCarthy Nakamura Kowalski Novak Schultz Larsen Lindqvist Dubois
    Rossi Moretti Kaur Singh Okafor Mensah Haddad Cohen Levy Friedman Sato Yamamoto
        """
    ),
    "Van Dyke",
    "De la Cruz",
    "Smith-Jones",
)
"""The most common family names, the most common first; a few of two words or hyphenated, as
real lists have."""

_STEMS = _words(
    """
    Ash Black Brook Bur Cald Carl Chat Craw Dal Dun Ell Fair Fern Gold Grims Hart Hol Kings Lang
    Lind Mar Mid Mor New North Oak Pen Rad Red Rock Rus Sel Shel Stan Stock Thorn Tre Wal War Wes
    Whit Wins Ald Bram Cran Hay Thur
    """
)
_ENDINGS = _words(
    "by well ton field worth ford ley wood ham more croft stead wick bridge brook dale combe hurst"
)


def _rare_surnames() -> tuple[str, ...]:
    """English place-name surnames (``Ashby``, ``Whitworth``): the long tail of rare names
    that a real customer base has, where each family name is shared by few people."""
    common = set(COMMON_SURNAMES)
    made = (stem + ending for stem in _STEMS for ending in _ENDINGS)
    return tuple(dict.fromkeys(name for name in made if name not in common))


SURNAMES = COMMON_SURNAMES + _rare_surnames()
"""Family names, the most common first."""


def popularity(count: int, exponent: float = 0.5) -> npt.NDArray[np.float64]:
    """Zipf-like probabilities of ``count`` names ordered from the most common."""
    weights = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** exponent
    result: npt.NDArray[np.float64] = weights / weights.sum()
    return result
