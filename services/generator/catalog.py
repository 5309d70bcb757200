"""What the retailer sells and shows: product categories with their price levels, the products,
the site's pages, and the business side's companies, job titles, lead sources and webinars.

Products are built from the seed like everything else, so that a catalog is the same for the
same seed; their popularity within a category is skewed, as sales are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from profilemesh.services.generator.names import popularity

SHOP_URL = "https://shop.northwind.example"
"""The retailer's web shop; page URLs and the demo's links start here."""
APP_NAME = "Northwind Shop"


@dataclass(frozen=True, slots=True)
class Category:
    """A product category: its name, URL slug, median price and the nouns of its products."""

    name: str
    slug: str
    median_price: float
    nouns: tuple[str, ...]


CATEGORIES = (
    Category(
        "Electronics",
        "electronics",
        79.0,
        ("Headphones", "Speaker", "Charger", "Smartwatch", "Keyboard", "Webcam", "Earbuds"),
    ),
    Category(
        "Home & Kitchen",
        "home-kitchen",
        39.0,
        ("Blender", "Knife Set", "Cookware Set", "Coffee Maker", "Towel Set", "Lamp", "Kettle"),
    ),
    Category(
        "Apparel",
        "apparel",
        35.0,
        ("T-Shirt", "Hoodie", "Jeans", "Sneakers", "Jacket", "Dress", "Scarf"),
    ),
    Category(
        "Beauty",
        "beauty",
        22.0,
        ("Moisturizer", "Shampoo", "Perfume", "Lipstick", "Face Serum", "Hair Dryer"),
    ),
    Category(
        "Toys & Games",
        "toys-games",
        27.0,
        ("Puzzle", "Board Game", "Building Set", "Plush Bear", "RC Car", "Doll"),
    ),
    Category(
        "Sports & Outdoors",
        "sports-outdoors",
        45.0,
        ("Yoga Mat", "Water Bottle", "Tent", "Backpack", "Dumbbells", "Bike Helmet"),
    ),
    Category(
        "Books",
        "books",
        16.0,
        ("Novel", "Cookbook", "Travel Guide", "Biography", "Picture Book"),
    ),
    Category(
        "Garden",
        "garden",
        29.0,
        ("Planter", "Garden Hose", "Pruning Shears", "Seed Kit", "Garden Chair"),
    ),
)

_ADJECTIVES = (
    "Classic",
    "Pro",
    "Eco",
    "Deluxe",
    "Compact",
    "Premium",
    "Everyday",
    "Ultra",
    "Essential",
    "Smart",
    "Travel",
    "Family",
)
PRODUCTS_PER_CATEGORY = 40


@dataclass(frozen=True, slots=True)
class Catalog:
    """The products, as parallel arrays indexed by product number."""

    product_id: list[str]
    name: list[str]
    category: npt.NDArray[np.int64]
    """Index into :data:`CATEGORIES`."""
    price: npt.NDArray[np.float64]
    popularity: npt.NDArray[np.float64]
    """Probabilities over the products of one category, the best seller first."""

    def product_numbers(
        self, category: npt.NDArray[np.int64], rank: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """The products at sales ``rank`` (0 is the best seller) in ``category``."""
        numbers: npt.NDArray[np.int64] = category * PRODUCTS_PER_CATEGORY + rank
        return numbers

    def properties(self, product: int) -> dict[str, object]:
        """The Segment e-commerce properties of a product (``Product Viewed`` and friends)."""
        return {
            "product_id": self.product_id[product],
            "name": self.name[product],
            "category": CATEGORIES[int(self.category[product])].name,
            "price": float(self.price[product]),
        }


def build_catalog(rng: np.random.Generator) -> Catalog:
    """The catalog: :data:`PRODUCTS_PER_CATEGORY` products per category, prices log-normal
    around the category's median and ending in .99 or .49, as shop prices do."""
    product_id: list[str] = []
    names: list[str] = []
    categories: list[int] = []
    prices: list[float] = []
    numbers = rng.permutation(90_000)[: len(CATEGORIES) * PRODUCTS_PER_CATEGORY] + 10_000
    for index, category in enumerate(CATEGORIES):
        start = len(product_id)
        raw = rng.lognormal(np.log(category.median_price), 0.55, PRODUCTS_PER_CATEGORY)
        endings = rng.choice([0.99, 0.49], PRODUCTS_PER_CATEGORY, p=[0.8, 0.2])
        adjectives = rng.integers(0, len(_ADJECTIVES), PRODUCTS_PER_CATEGORY)
        nouns = rng.integers(0, len(category.nouns), PRODUCTS_PER_CATEGORY)
        for k in range(PRODUCTS_PER_CATEGORY):
            product_id.append(f"SKU-{numbers[start + k]}")
            names.append(f"{_ADJECTIVES[adjectives[k]]} {category.nouns[nouns[k]]}")
            categories.append(index)
            prices.append(round(max(2.0, float(np.floor(raw[k]))) + float(endings[k]), 2))
    return Catalog(
        product_id=product_id,
        name=names,
        category=np.array(categories, dtype=np.int64),
        price=np.array(prices, dtype=np.float64),
        popularity=popularity(PRODUCTS_PER_CATEGORY, 1.1),
    )


@dataclass(frozen=True, slots=True)
class SitePage:
    """A page of the shop (a screen in the apps): its name, path and title."""

    name: str
    path: str
    title: str
    category: str = ""


PAGES = (
    SitePage("Home", "/", "Northwind - Everything for home and play"),
    *(SitePage("Category", f"/c/{c.slug}", f"{c.name} | Northwind", c.name) for c in CATEGORIES),
    SitePage("Search Results", "/search", "Search | Northwind"),
    SitePage("Deals", "/deals", "Today's deals | Northwind"),
    SitePage("Account", "/account", "Your account | Northwind"),
    SitePage("Cart", "/cart", "Your cart | Northwind"),
    SitePage("Help", "/help", "Help center | Northwind"),
)
PAGE_WEIGHTS = np.array(
    [0.30, *([0.35 / len(CATEGORIES)] * len(CATEGORIES)), 0.12, 0.10, 0.05, 0.05, 0.03]
)
"""How often each of :data:`PAGES` is viewed; sums to 1."""

PRICING_PAGE = SitePage("Business Pricing", "/business/pricing", "Northwind for Business")
"""The business accounts' pricing page: a lead's visits to it show intent."""

WEBINARS = (
    "Stocking your office the easy way",
    "Bulk ordering for schools",
    "Hospitality supplies masterclass",
    "Sustainable sourcing for small businesses",
)

COMPANY_WORDS = (
    "Blue Harbor",
    "Summit",
    "Ironwood",
    "Maple Leaf",
    "Silver Creek",
    "Red Rock",
    "Cedar Point",
    "Golden Gate",
    "Brightside",
    "Evergreen",
    "Lakeshore",
    "Pioneer",
    "Riverbend",
    "Stonebridge",
    "Sunrise",
    "Westfield",
    "Oakmont",
    "Harborview",
    "Northstar",
    "Copperline",
)
COMPANY_KINDS = (
    "Dental",
    "Logistics",
    "Hospitality",
    "Consulting",
    "Studios",
    "Academy",
    "Realty",
    "Fitness",
    "Cafe",
    "Clinic",
    "Builders",
    "Law Group",
)
JOB_TITLES = (
    "Office Manager",
    "Procurement Specialist",
    "Purchasing Manager",
    "Operations Director",
    "Facilities Coordinator",
    "Owner",
    "CEO",
    "Head of Operations",
    "IT Manager",
    "Executive Assistant",
)
LEAD_SOURCES = ("Webinar", "Trade Show", "Content Download", "Referral", "Paid Search", "Web Form")
LEAD_SOURCE_WEIGHTS = np.array([0.18, 0.12, 0.22, 0.10, 0.20, 0.18])
LEAD_SOURCE_LIFT = np.array([0.5, 0.2, 0.0, 0.9, -0.2, 0.3])
"""Added to a lead's conversion log-odds by its source: referrals convert best."""
