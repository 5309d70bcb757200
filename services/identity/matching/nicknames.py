"""Common English given names and their short forms, for the NICKNAME comparator.

String similarity cannot see that ``bill`` is ``william`` or ``peggy`` is ``margaret``; this
table can. Each group lists a formal name first and the forms people use for it; a name may be
in several groups (``chris``).
"""

from __future__ import annotations

from collections.abc import Mapping

_GROUPS = (
    "abigail abby abbie gail",
    "alexander alex alec alexandra sandy sasha xander",
    "alfred alf alfie fred",
    "andrew andy drew",
    "anthony tony",
    "barbara barb babs",
    "benjamin ben benny benji",
    "catherine katherine kathryn cathy kathy kate katie kat kitty",
    "charles charlie chuck chas",
    "christopher chris kit topher",
    "christine christina chris chrissy tina",
    "daniel dan danny",
    "david dave davey",
    "deborah debra deb debbie",
    "donald don donny",
    "dorothy dot dottie",
    "edward ed eddie ted teddy ned",
    "elizabeth liz lizzie beth betty bess bessie eliza libby elsie",
    "frances fran frankie",
    "francis frank frankie",
    "frederick fred freddie",
    "gregory greg",
    "harold harry hal",
    "henry harry hank hal",
    "isabella isabel isabelle bella izzy",
    "jacob jake",
    "james jim jimmy jamie",
    "jennifer jen jenny",
    "jessica jess jessie",
    "john jack johnny jon",
    "jonathan jon jonny",
    "joseph joe joey",
    "joshua josh",
    "judith judy",
    "kenneth ken kenny",
    "lawrence laurence larry",
    "leonard leo len lenny",
    "margaret maggie meg peggy marge madge greta",
    "matthew matt",
    "michael mike mick mickey",
    "nathan nathaniel nat nate",
    "nicholas nick nicky",
    "patricia pat patty trish tricia",
    "patrick pat paddy",
    "peter pete",
    "philip phillip phil",
    "rebecca becky becca",
    "richard rick ricky dick rich",
    "robert rob bob bobby robbie bert",
    "ronald ron ronnie",
    "samantha sam sammy",
    "samuel sam sammy",
    "stephen steven steve",
    "susan sue susie",
    "theodore theo ted teddy",
    "thomas tom tommy",
    "timothy tim timmy",
    "victoria vicky tori",
    "walter walt wally",
    "william will bill billy liam willy",
    "zachary zach zack",
)

NICKNAME_GROUPS: Mapping[str, frozenset[int]] = {}
"""Each known name to the numbers of the groups it belongs to."""

_groups: dict[str, set[int]] = {}
for _number, _group in enumerate(_GROUPS):
    for _name in _group.split():
        _groups.setdefault(_name, set()).add(_number)
NICKNAME_GROUPS = {name: frozenset(numbers) for name, numbers in _groups.items()}


def same_name(left: str, right: str) -> bool:
    """Whether ``left`` and ``right`` are forms of one given name per the table."""
    groups = NICKNAME_GROUPS.get(left)
    return bool(groups and groups & NICKNAME_GROUPS.get(right, frozenset()))
