//! The fixed shape of the marketplace: countries, currencies, makes, segments, vocabularies.

/// (country, currency, weight in listings, approximate EUR per unit of the currency).
pub const COUNTRIES: &[(&str, &str, u32, f64)] = &[
    ("AT", "EUR", 6, 1.0),
    ("BE", "EUR", 5, 1.0),
    ("CZ", "CZK", 4, 0.0400),
    ("DE", "EUR", 25, 1.0),
    ("DK", "DKK", 3, 0.1340),
    ("ES", "EUR", 10, 1.0),
    ("FR", "EUR", 14, 1.0),
    ("HU", "HUF", 3, 0.00250),
    ("IT", "EUR", 12, 1.0),
    ("LU", "EUR", 1, 1.0),
    ("NL", "EUR", 7, 1.0),
    ("PL", "PLN", 6, 0.2330),
    ("RO", "RON", 3, 0.2010),
    ("SE", "SEK", 3, 0.0880),
    ("CH", "CHF", 4, 1.0450),
];

/// The non-euro currencies, in a fixed order, with their starting EUR rate.
pub const FX_CURRENCIES: &[(&str, f64)] = &[
    ("CZK", 0.0400),
    ("DKK", 0.1340),
    ("HUF", 0.00250),
    ("PLN", 0.2330),
    ("RON", 0.2010),
    ("SEK", 0.0880),
    ("CHF", 1.0450),
];

pub fn country_index(code: &str) -> Option<usize> {
    COUNTRIES.iter().position(|c| c.0 == code)
}

pub fn currency_of(country: &str) -> &'static str {
    COUNTRIES.iter().find(|c| c.0 == country).map_or("EUR", |c| c.1)
}

pub fn approx_eur_rate(currency: &str) -> f64 {
    FX_CURRENCIES.iter().find(|c| c.0 == currency).map_or(1.0, |c| c.1)
}

/// (slug, name, weight in listings, price factor).
pub const MAKES: &[(&str, &str, u32, f64)] = &[
    ("vw", "Volkswagen", 120, 1.0),
    ("bmw", "BMW", 70, 1.4),
    ("mercedes_benz", "Mercedes-Benz", 70, 1.5),
    ("audi", "Audi", 60, 1.35),
    ("opel", "Opel", 50, 0.85),
    ("ford", "Ford", 50, 0.9),
    ("skoda", "Škoda", 50, 0.9),
    ("renault", "Renault", 50, 0.85),
    ("peugeot", "Peugeot", 45, 0.85),
    ("toyota", "Toyota", 40, 1.0),
    ("fiat", "Fiat", 40, 0.75),
    ("citroen", "Citroën", 30, 0.8),
    ("seat", "SEAT", 30, 0.9),
    ("hyundai", "Hyundai", 30, 0.95),
    ("kia", "Kia", 30, 0.95),
    ("dacia", "Dacia", 30, 0.65),
    ("volvo", "Volvo", 20, 1.3),
    ("mazda", "Mazda", 20, 1.0),
    ("nissan", "Nissan", 20, 0.9),
    ("tesla", "Tesla", 12, 1.6),
    ("mini", "MINI", 15, 1.1),
    ("porsche", "Porsche", 8, 3.0),
    ("alfa_romeo", "Alfa Romeo", 8, 1.1),
    ("land_rover", "Land Rover", 8, 1.8),
    ("jeep", "Jeep", 8, 1.2),
    ("suzuki", "Suzuki", 10, 0.75),
    ("honda", "Honda", 10, 0.95),
    ("mitsubishi", "Mitsubishi", 8, 0.85),
    ("cupra", "Cupra", 8, 1.2),
    ("smart", "smart", 6, 0.8),
    ("jaguar", "Jaguar", 5, 1.7),
    ("lexus", "Lexus", 5, 1.6),
    ("ds_automobiles", "DS Automobiles", 4, 1.1),
    ("subaru", "Subaru", 5, 1.0),
    ("ssangyong", "SsangYong", 4, 0.85),
    ("mg", "MG", 6, 0.8),
    ("polestar", "Polestar", 3, 1.7),
    ("aston_martin", "Aston Martin", 1, 5.0),
    ("rolls_royce", "Rolls-Royce", 1, 9.0),
    ("lancia", "Lancia", 3, 0.8),
];

/// Roughly 1,500 models in all.
pub const TARGET_MODELS: usize = 1500;

/// (segment, base price in EUR, typical power in kW).
pub const SEGMENTS: &[(&str, f64, i64)] = &[
    ("A", 9_000.0, 55),
    ("B", 13_000.0, 70),
    ("C", 20_000.0, 100),
    ("D", 28_000.0, 130),
    ("E", 40_000.0, 170),
    ("F", 75_000.0, 250),
    ("J", 30_000.0, 130),
    ("M", 22_000.0, 100),
    ("S", 55_000.0, 240),
];

pub const BODY_TYPES: &[&str] =
    &["hatchback", "sedan", "estate", "suv", "coupe", "convertible", "mpv", "van", "pickup"];

pub const FUELS: &[(&str, u32)] =
    &[("petrol", 45), ("diesel", 35), ("hybrid", 8), ("electric", 8), ("lpg", 2), ("cng", 2)];

pub const GEARBOXES: &[&str] = &["manual", "automatic"];

pub const COLORS: &[&str] =
    &["black", "white", "grey", "silver", "blue", "red", "green", "brown", "beige", "yellow", "orange"];

pub const NAME_SYLLABLES: &[&str] = &[
    "Ar", "Bel", "Cor", "Del", "Es", "Fi", "Gal", "Hor", "Ix", "Jun", "Kor", "Lum", "Mar", "Nov", "Or", "Pra", "Quin",
    "Ros", "Sol", "Tor", "Ul", "Ver", "Wen", "Xa", "Yar", "Zen", "Cal", "Mon",
];

pub const NAME_ENDINGS: &[&str] = &["a", "o", "is", "on", "ar", "ia", "ex", "us", "ento", "ano"];

pub const MODEL_VARIANTS: &[&str] = &[
    "", "", "", " Sport", " Touring", " Cross", " e", " Hybrid", " GT", " Plus", " Van", " Coupé", " Cabrio",
    " Allroad", " Kombi",
];

/// Engine labels used in titles, by fuel.
pub fn engine_label(fuel: &str, power_kw: Option<i16>) -> String {
    let kw = power_kw.unwrap_or(100);
    match fuel {
        "electric" => format!("{kw} kW"),
        "diesel" => format!("{:.1} TDI", 1.0 + f64::from(kw.min(300)) / 100.0),
        "hybrid" => format!("{:.1} Hybrid", 1.0 + f64::from(kw.min(300)) / 120.0),
        _ => format!("{:.1} TSI", 0.8 + f64::from(kw.min(400)) / 110.0),
    }
}

/// Trim words and the real-world noise sellers put in titles.
pub const TITLE_EXTRAS: &[&str] = &[
    " Life",
    " Comfortline",
    " Highline",
    " Style",
    " – TÜV neu",
    ", 1. Hand",
    " \"Garantie\"",
    " 😀 Top!",
    " Ø 5,9 l/100km",
    " (Scheckheft)",
    " 100% €",
    " à vendre, très bon état",
    " Kč vč. DPH",
    " Navi\tKlima",
    " AHK\nSitzheizung",
    " C:\\Bilder\\auto.jpg",
    " ½ Leder",
    " 'Sonderedition'",
    " — kúpiť",
    " Ünfallfrei",
];

pub const DEALER_WORDS: &[&str] =
    &["Auto", "Autohaus", "Garage", "Motors", "Cars", "Automobile", "Autocentrum", "Car Center"];

pub const SURNAMES: &[&str] = &[
    "Müller",
    "Schmidt",
    "Novák",
    "Jensen",
    "García",
    "Dubois",
    "Nagy",
    "Rossi",
    "Schneider",
    "De Vries",
    "Kowalski",
    "Popescu",
    "Andersson",
    "Meier",
    "Peeters",
    "Weber",
    "Dvořák",
    "Ørsted",
];
