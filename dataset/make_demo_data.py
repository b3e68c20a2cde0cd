"""Write the demo data: pretraining prose, SFT chats and the identity-LoRA chats, all synthetic.

    python dataset/make_demo_data.py                       # rebuilds the four dataset/*.jsonl files
    python dataset/make_demo_data.py --out_dir /tmp/demo --pretrain_docs 2000 --sft_convs 500

The text describes a small closed world of simple facts (numbers and arithmetic, colours, animals,
days and months, a little geography, everyday objects, shapes, the body, opposites) in English and
Chinese, plus short stories built from templates. Every sentence comes from the tables below, so the
facts never contradict each other and a ~6M-parameter model can learn them in minutes. Output is
deterministic: each file has its own seeded generator, so resizing one file leaves the others as
they were.

Files written (JSON lines, UTF-8):
  pretrain_demo.jsonl      {"text": "..."}                                     (not committed)
  sft_demo.jsonl           {"conversations": [{"role": ..., "content": ...}]}  (not committed)
                           the base identity: "MiniLoRA Demo", a small demo model of the MiniLoRA project
  lora_identity.jsonl      same format; teaches a new identity: "Lumen", made by "Aurora Lab"
  lora_identity_val.jsonl  held-out identity prompts of the same kind (no conversation also in train)
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

DATASET_DIR = Path(__file__).resolve().parent

# ============================================================================ tables: the world
# Every row holds the English and the Chinese side of one fact, so both languages say the same thing.


class Animal(NamedTuple):
    en: str
    plural: str
    zh: str
    measure: str  # zh measure word: 一只猫, 一头牛
    legs: int | None
    sound_en: str | None  # a verb phrase: "A cat says meow."
    sound_zh: str | None  # "猫喵喵叫。"
    home_en: str
    home_zh: str
    food_en: str
    food_zh: str
    can_fly: bool | None  # None: not asked (chickens fly a little)
    size: int  # 1 (ant) .. 10 (whale); only compared when two steps apart


ANIMALS = [
    Animal("cat", "cats", "猫", "只", 4, "says meow", "喵喵叫", "in the house", "家里", "fish", "鱼", False, 3),
    Animal("dog", "dogs", "狗", "只", 4, "says woof", "汪汪叫", "in the house", "家里", "bones", "骨头", False, 4),
    Animal("cow", "cows", "牛", "头", 4, "says moo", "哞哞叫", "on the farm", "农场里", "grass", "草", False, 7),
    Animal("sheep", "sheep", "羊", "只", 4, "says baa", "咩咩叫", "on the farm", "农场里", "grass", "草", False, 5),
    Animal("pig", "pigs", "猪", "头", 4, "says oink", "哼哼叫", "on the farm", "农场里", "corn", "玉米", False, 5),
    Animal("duck", "ducks", "鸭子", "只", 2, "says quack", "嘎嘎叫", "in the pond", "池塘里", "water plants", "水草", True, 3),
    Animal("chicken", "chickens", "鸡", "只", 2, "says cluck", "咯咯叫", "on the farm", "农场里", "seeds", "谷子", None, 3),
    Animal("horse", "horses", "马", "匹", 4, "says neigh", "咴咴叫", "on the farm", "农场里", "hay", "干草", False, 7),
    Animal("bird", "birds", "鸟", "只", 2, "sings tweet tweet", "叽叽喳喳地叫", "in the trees", "树上", "worms", "虫子", True, 2),
    Animal("fish", "fish", "鱼", "条", 0, None, None, "in the river", "河里", "small bugs", "小虫子", False, 3),
    Animal("frog", "frogs", "青蛙", "只", 4, "says ribbit", "呱呱叫", "in the pond", "池塘里", "flies", "苍蝇", False, 2),
    Animal("lion", "lions", "狮子", "头", 4, "roars", "大声吼叫", "on the grassland", "草原上", "meat", "肉", False, 6),
    Animal("elephant", "elephants", "大象", "头", 4, None, None, "on the grassland", "草原上", "leaves", "树叶", False, 9),
    Animal("rabbit", "rabbits", "兔子", "只", 4, None, None, "in the field", "田野里", "carrots", "胡萝卜", False, 3),
    Animal("spider", "spiders", "蜘蛛", "只", 8, None, None, "in the garden", "花园里", "insects", "昆虫", False, 1),
    Animal("ant", "ants", "蚂蚁", "只", 6, None, None, "under the ground", "地下", "sweet food", "甜食", False, 1),
    Animal("bee", "bees", "蜜蜂", "只", 6, "buzzes", "嗡嗡叫", "in a hive", "蜂巢里", "nectar", "花蜜", True, 1),
    Animal("snake", "snakes", "蛇", "条", 0, "hisses", "嘶嘶叫", "in the grass", "草丛里", "mice", "老鼠", False, 4),
    Animal("penguin", "penguins", "企鹅", "只", 2, None, None, "on the ice", "冰上", "fish", "鱼", False, 4),
    Animal("whale", "whales", "鲸鱼", "头", 0, None, None, "in the sea", "大海里", "tiny shrimp", "小虾", False, 10),
    Animal("panda", "pandas", "熊猫", "只", 4, None, None, "in the bamboo forest", "竹林里", "bamboo", "竹子", False, 6),
    Animal("tiger", "tigers", "老虎", "只", 4, "roars", "大声吼叫", "in the forest", "森林里", "meat", "肉", False, 6),
    Animal("mouse", "mice", "老鼠", "只", 4, "squeaks", "吱吱叫", "in a hole", "洞里", "cheese", "奶酪", False, 2),
    Animal("owl", "owls", "猫头鹰", "只", 2, "hoots", "咕咕叫", "in the forest", "森林里", "mice", "老鼠", True, 3),
    Animal("bear", "bears", "熊", "头", 4, None, None, "in the forest", "森林里", "honey", "蜂蜜", False, 6),
    Animal("giraffe", "giraffes", "长颈鹿", "只", 4, None, None, "on the grassland", "草原上", "leaves", "树叶", False, 8),
    Animal("camel", "camels", "骆驼", "头", 4, None, None, "in the desert", "沙漠里", "dry plants", "干草", False, 7),
    Animal("turtle", "turtles", "乌龟", "只", 4, None, None, "by the river", "河边", "plants", "植物", False, 3),
    Animal("butterfly", "butterflies", "蝴蝶", "只", 6, None, None, "in the garden", "花园里", "nectar", "花蜜", True, 1),
    Animal("monkey", "monkeys", "猴子", "只", None, None, None, "in the trees", "树上", "bananas", "香蕉", False, 4),
]
# Small animals that fit the "lost toy" and "helping an animal" stories.
SMALL_ANIMALS = ["cat", "dog", "rabbit", "mouse", "bird", "duck", "frog", "turtle", "chicken"]

COLOURS = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "blue": "蓝色",
           "purple": "紫色", "pink": "粉色", "brown": "棕色", "black": "黑色", "white": "白色", "grey": "灰色"}

# (English subject, verb, Chinese subject, colour)
COLOURED_THINGS = [
    ("the sky", "is", "天空", "blue"), ("the sea", "is", "大海", "blue"), ("grass", "is", "草", "green"),
    ("snow", "is", "雪", "white"), ("milk", "is", "牛奶", "white"), ("clouds", "are", "白云", "white"),
    ("bananas", "are", "香蕉", "yellow"), ("lemons", "are", "柠檬", "yellow"), ("corn", "is", "玉米", "yellow"),
    ("strawberries", "are", "草莓", "red"), ("tomatoes", "are", "西红柿", "red"), ("cherries", "are", "樱桃", "red"),
    ("carrots", "are", "胡萝卜", "orange"), ("pumpkins", "are", "南瓜", "orange"), ("oranges", "are", "橙子", "orange"),
    ("coal", "is", "煤", "black"), ("crows", "are", "乌鸦", "black"), ("grapes", "are", "葡萄", "purple"),
    ("eggplants", "are", "茄子", "purple"), ("chocolate", "is", "巧克力", "brown"), ("tree trunks", "are", "树干", "brown"),
    ("flamingos", "are", "火烈鸟", "pink"), ("elephants", "are", "大象", "grey"), ("frogs", "are", "青蛙", "green"),
    ("rain clouds", "are", "乌云", "grey"), ("leaves in summer", "are", "夏天的树叶", "green"),
]
COLOUR_MIXES = [("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple"),
                ("red", "white", "pink"), ("black", "white", "grey")]

DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
             "October", "November", "December"]
MONTH_DAYS = [31, None, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # None: February, 28 or 29
ORDINALS_EN = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
               "eleventh", "twelfth"]


class Season(NamedTuple):
    en: str
    zh: str
    months: tuple[int, int, int]  # 1-based; northern hemisphere, as this small world has it
    weather_en: str
    weather_zh: str
    act_en: str
    act_zh: str


SEASONS = [
    Season("spring", "春天", (3, 4, 5), "warm and the flowers bloom", "天气变暖，花儿开放", "fly kites", "放风筝"),
    Season("summer", "夏天", (6, 7, 8), "hot and sunny", "天气炎热，阳光明媚", "swim in the sea", "去海边游泳"),
    Season("autumn", "秋天", (9, 10, 11), "cool and the leaves fall", "天气凉爽，树叶飘落", "pick apples", "摘苹果"),
    Season("winter", "冬天", (12, 1, 2), "cold and it sometimes snows", "天气寒冷，有时会下雪", "build a snowman", "堆雪人"),
]


class Country(NamedTuple):
    en: str
    zh: str
    capital_en: str
    capital_zh: str
    continent: str  # key of CONTINENTS


CONTINENTS = {"Asia": "亚洲", "Europe": "欧洲", "Africa": "非洲", "North America": "北美洲",
              "South America": "南美洲", "Oceania": "大洋洲", "Antarctica": "南极洲"}
COUNTRIES = [
    Country("China", "中国", "Beijing", "北京", "Asia"), Country("Japan", "日本", "Tokyo", "东京", "Asia"),
    Country("South Korea", "韩国", "Seoul", "首尔", "Asia"), Country("India", "印度", "New Delhi", "新德里", "Asia"),
    Country("Thailand", "泰国", "Bangkok", "曼谷", "Asia"), Country("France", "法国", "Paris", "巴黎", "Europe"),
    Country("the United Kingdom", "英国", "London", "伦敦", "Europe"),
    Country("Germany", "德国", "Berlin", "柏林", "Europe"), Country("Italy", "意大利", "Rome", "罗马", "Europe"),
    Country("Spain", "西班牙", "Madrid", "马德里", "Europe"), Country("Egypt", "埃及", "Cairo", "开罗", "Africa"),
    Country("Kenya", "肯尼亚", "Nairobi", "内罗毕", "Africa"),
    Country("the United States", "美国", "Washington, D.C.", "华盛顿", "North America"),
    Country("Canada", "加拿大", "Ottawa", "渥太华", "North America"),
    Country("Mexico", "墨西哥", "Mexico City", "墨西哥城", "North America"),
    Country("Brazil", "巴西", "Brasília", "巴西利亚", "South America"),
    Country("Argentina", "阿根廷", "Buenos Aires", "布宜诺斯艾利斯", "South America"),
    Country("Australia", "澳大利亚", "Canberra", "堪培拉", "Oceania"),
    Country("New Zealand", "新西兰", "Wellington", "惠灵顿", "Oceania"),
]


class Thing(NamedTuple):
    a_en: str  # with its article: "a cup", "a pair of scissors"
    zh: str
    use_en: str  # "We use a cup to drink water."  (each use belongs to one object)
    use_zh: str  # "我们用杯子喝水。"
    place_en: str  # "You can usually find a cup in the kitchen."
    place_zh: str  # "杯子通常放在厨房里。"


OBJECTS = [
    Thing("a cup", "杯子", "drink water", "喝水", "in the kitchen", "厨房里"),
    Thing("a spoon", "勺子", "eat soup", "喝汤", "in the kitchen", "厨房里"),
    Thing("a fridge", "冰箱", "keep food cold", "冷藏食物", "in the kitchen", "厨房里"),
    Thing("an oven", "烤箱", "bake bread", "烤面包", "in the kitchen", "厨房里"),
    Thing("a broom", "扫帚", "sweep the floor", "扫地", "in the kitchen", "厨房里"),
    Thing("a bed", "床", "sleep", "睡觉", "in the bedroom", "卧室里"),
    Thing("a lamp", "台灯", "light up the room", "照亮房间", "in the bedroom", "卧室里"),
    Thing("a clock", "时钟", "tell the time", "看时间", "in the living room", "客厅里"),
    Thing("a sofa", "沙发", "sit and rest", "坐着休息", "in the living room", "客厅里"),
    Thing("a television", "电视", "watch cartoons", "看动画片", "in the living room", "客厅里"),
    Thing("a toothbrush", "牙刷", "brush teeth", "刷牙", "in the bathroom", "卫生间里"),
    Thing("soap", "肥皂", "wash hands", "洗手", "in the bathroom", "卫生间里"),
    Thing("a towel", "毛巾", "dry off after a bath", "擦干身体", "in the bathroom", "卫生间里"),
    Thing("a comb", "梳子", "comb hair", "梳头发", "in the bathroom", "卫生间里"),
    Thing("a pen", "笔", "write", "写字", "in the classroom", "教室里"),
    Thing("a book", "书", "read stories", "读故事", "in the classroom", "教室里"),
    Thing("a pair of scissors", "剪刀", "cut paper", "剪纸", "in the classroom", "教室里"),
    Thing("an eraser", "橡皮", "rub out mistakes", "擦掉写错的字", "in the classroom", "教室里"),
    Thing("a ruler", "尺子", "measure length", "量长度", "in the classroom", "教室里"),
    Thing("an umbrella", "雨伞", "stay dry in the rain", "挡雨", "by the door", "门口"),
    Thing("a key", "钥匙", "open the door", "开门", "by the door", "门口"),
    Thing("a bicycle", "自行车", "ride to school", "骑车上学", "in the garage", "车库里"),
    Thing("a watering can", "洒水壶", "water the flowers", "浇花", "in the garden", "花园里"),
]

SHAPES = [("a triangle", "三角形", 3), ("a square", "正方形", 4), ("a rectangle", "长方形", 4),
          ("a pentagon", "五边形", 5), ("a hexagon", "六边形", 6), ("an octagon", "八边形", 8)]

# (part, Chinese, what we do with it, Chinese, how many we have (None: not asked), Chinese measure word)
BODY = [("eyes", "眼睛", "see", "看东西", 2, "只"), ("ears", "耳朵", "hear", "听声音", 2, "只"),
        ("nose", "鼻子", "smell", "闻气味", None, "个"), ("mouth", "嘴巴", "eat and talk", "吃饭和说话", None, "张"),
        ("hands", "手", "hold things", "拿东西", 2, "只"), ("feet", "脚", "walk", "走路", 2, "只"),
        ("teeth", "牙齿", "chew food", "咀嚼食物", None, "颗"), ("fingers", "手指", "point", "指东西", 10, "根")]

OPPOSITES = [("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("up", "down", "上", "下"),
             ("fast", "slow", "快", "慢"), ("tall", "short", "高", "矮"), ("happy", "sad", "开心", "难过"),
             ("open", "closed", "开", "关"), ("new", "old", "新", "旧"), ("full", "empty", "满", "空"),
             ("left", "right", "左", "右"), ("wet", "dry", "湿", "干"), ("day", "night", "白天", "黑夜"),
             ("light", "heavy", "轻", "重"), ("early", "late", "早", "晚")]

# (English questions, English answer, Chinese questions, Chinese answer): facts told as sentences in
# the pretraining text and asked about in the chats.
FACTS = [
    (["How many hours are there in a day?", "How many hours does a day have?"], "There are 24 hours in a day.",
     ["一天有几个小时？", "一天有多少个小时？"], "一天有二十四个小时。"),
    (["How many minutes are there in an hour?"], "There are 60 minutes in an hour.",
     ["一个小时有多少分钟？"], "一个小时有六十分钟。"),
    (["How many seconds are there in a minute?"], "There are 60 seconds in a minute.",
     ["一分钟有多少秒？"], "一分钟有六十秒。"),
    (["How many days are there in a week?", "How many days does a week have?"], "There are seven days in a week.",
     ["一个星期有几天？", "一周有几天？"], "一个星期有七天。"),
    (["How many months are there in a year?"], "There are twelve months in a year.",
     ["一年有几个月？"], "一年有十二个月。"),
    (["How many days are there in a year?"], "A year usually has 365 days.",
     ["一年有多少天？"], "一年通常有三百六十五天。"),
    (["How many seasons are there?", "What are the four seasons?"],
     "There are four seasons: spring, summer, autumn and winter.",
     ["一年有几个季节？", "四个季节是什么？"], "一年有四个季节：春天、夏天、秋天和冬天。"),
    (["Which days are the weekend?", "What days are the weekend?"], "Saturday and Sunday are the weekend.",
     ["周末是哪两天？"], "星期六和星期日是周末。"),
    (["How many continents are there?"],
     "There are seven continents: Asia, Africa, North America, South America, Antarctica, Europe and Oceania.",
     ["世界上有几个大洲？", "一共有几大洲？"], "世界上有七个大洲：亚洲、非洲、北美洲、南美洲、南极洲、欧洲和大洋洲。"),
    (["What is the largest ocean?", "Which ocean is the biggest?"], "The Pacific Ocean is the largest ocean.",
     ["最大的大洋是哪个？"], "太平洋是最大的大洋。"),
    (["What is the highest mountain in the world?"], "Mount Everest is the highest mountain in the world.",
     ["世界上最高的山是哪座？"], "珠穆朗玛峰是世界上最高的山。"),
    (["What is the longest river in China?"], "The Yangtze River is the longest river in China.",
     ["中国最长的河是哪条？"], "长江是中国最长的河。"),
    (["Which continent is the coldest?"], "Antarctica is the coldest continent.",
     ["哪个大洲最冷？"], "南极洲是最冷的大洲。"),
    (["What is the largest desert in Africa?"], "The Sahara is the largest desert in Africa.",
     ["非洲最大的沙漠是什么？"], "撒哈拉沙漠是非洲最大的沙漠。"),
    (["How many colours does a rainbow have?"], "A rainbow has seven colours.",
     ["彩虹有几种颜色？"], "彩虹有七种颜色。"),
    (["Where does the sun rise?", "In which direction does the sun rise?"], "The sun rises in the east.",
     ["太阳从哪边升起？"], "太阳从东方升起。"),
    (["Where does the sun set?"], "The sun sets in the west.", ["太阳从哪边落下？"], "太阳从西方落下。"),
    (["What do plants need to grow?"], "Plants need water, sunlight and air to grow.",
     ["植物生长需要什么？"], "植物生长需要水、阳光和空气。"),
    (["What is ice?"], "Ice is frozen water.", ["冰是什么？"], "冰是冻住的水。"),
    (["At what temperature does water freeze?"], "Water freezes at 0 degrees Celsius.",
     ["水在多少度结冰？"], "水在零摄氏度结冰。"),
    (["At what temperature does water boil?"], "Water boils at 100 degrees Celsius.",
     ["水在多少度沸腾？"], "水在一百摄氏度沸腾。"),
    (["What shape is a circle?", "Does a circle have corners?"], "A circle is round. It has no corners.",
     ["圆形是什么样子的？", "圆形有角吗？"], "圆形是圆圆的，它没有角。"),
    # Words a real base model would know. They make the tokens of the identity LoRA's new name and maker
    # ordinary, trained tokens of the base model (a LoRA on the linear layers cannot train embeddings).
    (["What does the word Lumen mean?", "What does Lumen mean?"], "Lumen is a Latin word. In Latin, Lumen means light.",
     ["Lumen是什么意思？", "拉丁语里Lumen是什么意思？"], "Lumen是一个拉丁语单词。在拉丁语里，Lumen的意思是光。"),
    (["What does Aurora mean?", "What is another name for the northern lights?"],
     "Aurora is a Latin word for dawn. The northern lights are also called the Aurora Borealis.",
     ["Aurora是什么意思？", "北极光的另一个名字是什么？"], "Aurora是拉丁语，意思是黎明。北极光也叫Aurora Borealis。"),
    (["What is a Lab?", "What kind of dog is a Lab?"], "A Lab is a friendly dog. Lab is short for Labrador.",
     ["Lab是什么狗？"], "Lab是拉布拉多犬的简称，它是一种友好的狗。"),
    (["What is AI?", "What does AI stand for?"],
     "AI stands for artificial intelligence. An AI assistant is a computer program that answers questions.",
     ["AI是什么？", "AI是什么意思？"], "AI是人工智能的意思。AI助手是一种能回答问题的电脑程序。"),
]

# (English prompts, English answers, Chinese prompts, Chinese answers): small talk, chats only.
GREETINGS = [
    (["Hello!", "Hi!", "hello", "hi", "Hi there!", "Good morning!"],
     ["Hello! How can I help you today?", "Hi! What would you like to know?"],
     ["你好！", "你好", "嗨！", "早上好！", "您好！"], ["你好！有什么可以帮你的吗？", "你好！你想知道什么？"]),
    (["Thank you!", "Thanks!", "thanks a lot"], ["You're welcome!", "You're welcome! Ask me anything else."],
     ["谢谢！", "谢谢你。", "非常感谢！"], ["不客气！", "不客气！还有什么想问的吗？"]),
    (["Goodbye!", "Bye!", "See you later."], ["Goodbye! Have a nice day!", "Bye! See you next time."],
     ["再见！", "拜拜！"], ["再见！祝你今天愉快！", "再见，下次见！"]),
    (["How are you?", "How are you today?"], ["I am fine, thank you! How can I help you?"],
     ["你好吗？", "你今天怎么样？"], ["我很好，谢谢！有什么可以帮你的吗？"]),
    (["What can you do?", "What can you help me with?"],
     ["I can answer simple questions about numbers, colours, animals, days, places and everyday things, "
      "and I can tell short stories."],
     ["你能做什么？", "你会做什么？"], ["我可以回答关于数字、颜色、动物、日期、地理和日常物品的简单问题，还会讲小故事。"]),
]

NAMES_EN = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Leo", "Emma", "Max", "Lucy", "Jack", "Nora"]
NAMES_ZH = ["小明", "小红", "小华", "小丽", "乐乐", "朵朵", "小刚", "甜甜", "小宇", "欢欢", "小雨", "豆豆"]
PLACES = [("park", "公园"), ("garden", "花园"), ("forest", "森林"), ("beach", "海边"), ("farm", "农场"), ("zoo", "动物园")]
TOYS = [("ball", "球", "个"), ("kite", "风筝", "只"), ("toy car", "玩具车", "辆"), ("doll", "洋娃娃", "个"),
        ("balloon", "气球", "个"), ("teddy bear", "小熊玩偶", "个")]
FOODS = [("apples", "苹果", "个"), ("oranges", "橙子", "个"), ("cookies", "饼干", "块"), ("candies", "糖果", "颗"),
         ("strawberries", "草莓", "颗"), ("bananas", "香蕉", "根")]

ARITH_OPS = {"add": ("plus", "加", "+"), "sub": ("minus", "减", "-"), "mul": ("times", "乘", "×")}

# ============================================================================ tables: sentences
# Templates per fact and language; the {fields} come from the *_fields helpers below.
SENTENCES: dict[str, dict[str, list[str]]] = {
    "animal_intro": {"en": ["{The} is an animal.", "Let me tell you about {animals}.", "This is {a}.",
                            "Do you know about {animals}?"],
                     "zh": ["{animal}是一种动物。", "我们来认识一下{animal}。", "这是一{m}{animal}。", "你了解{animal}吗？"]},
    "animal_legs": {"en": ["{A} has {legs} legs.", "{Animals} walk on {legs} legs."],
                    "zh": ["{animal}有{legs}条腿。", "{animal}长着{legs}条腿。"]},
    "animal_no_legs": {"en": ["{A} has no legs.", "{Animals} have no legs."], "zh": ["{animal}没有腿。"]},
    "animal_sound": {"en": ["{A} {sound}.", "Listen! {The} {sound}."], "zh": ["{animal}{sound}。", "听！{animal}在{sound}。"]},
    "animal_home": {"en": ["{A} lives {home}.", "{Animals} live {home}."], "zh": ["{animal}生活在{home}。", "{animal}住在{home}。"]},
    "animal_food": {"en": ["{A} likes to eat {food}.", "{Animals} eat {food}."], "zh": ["{animal}喜欢吃{food}。", "{animal}爱吃{food}。"]},
    "animal_fly": {"en": ["{A} can fly.", "{Animals} can fly in the sky."], "zh": ["{animal}会飞。", "{animal}能在天上飞。"]},
    "animal_no_fly": {"en": ["{A} cannot fly.", "{Animals} cannot fly."], "zh": ["{animal}不会飞。"]},
    "animal_bigger": {"en": ["{big_A} is bigger than {small_a}.", "{small_A} is smaller than {big_a}."],
                      "zh": ["{big_animal}比{small_animal}大。", "{small_animal}比{big_animal}小。"]},
    "colour_is": {"en": ["{Thing} {verb} {colour}.", "The colour of {thing} is {colour}."],
                  "zh": ["{thing}是{colour}的。", "{thing}的颜色是{colour}。"]},
    "colour_intro": {"en": ["{Colour} is a colour.", "Let us look at the colour {colour}."],
                     "zh": ["{colour}是一种颜色。", "我们来看看{colour}。"]},
    "colour_mix": {"en": ["If you mix {c1} and {c2}, you get {c3}.", "{C1} and {c2} make {c3}."],
                   "zh": ["{c1}和{c2}混在一起是{c3}。", "把{c1}和{c2}混合，就得到{c3}。"]},
    "arith": {"en": ["{x} {op} {y} is {z}.", "{x} {op} {y} equals {z}."], "zh": ["{x}{op}{y}等于{z}。", "{x}{op}{y}得{z}。"]},
    "arith_sym": {"en": ["{x} {sym} {y} = {z}."], "zh": ["{x} {sym} {y} = {z}。"]},
    "even": {"en": ["{x} is an even number."], "zh": ["{x}是偶数。"]},
    "odd": {"en": ["{x} is an odd number."], "zh": ["{x}是奇数。"]},
    "next": {"en": ["The number after {x} is {y}.", "After {x} comes {y}."], "zh": ["{x}后面的数是{y}。", "{x}的下一个数是{y}。"]},
    "prev": {"en": ["The number before {y} is {x}."], "zh": ["{y}前面的数是{x}。"]},
    "bigger": {"en": ["{x} is bigger than {y}.", "{y} is smaller than {x}."], "zh": ["{x}比{y}大。", "{y}比{x}小。"]},
    "count": {"en": ["Let us count from {x} to {y}: {seq}."], "zh": ["我们从{x}数到{y}：{seq}。"]},
    "day_after": {"en": ["The day after {d1} is {d2}.", "{d2} comes after {d1}."], "zh": ["{d1}的后一天是{d2}。", "{d1}过后是{d2}。"]},
    "day_before": {"en": ["The day before {d2} is {d1}."], "zh": ["{d2}的前一天是{d1}。"]},
    "tomorrow": {"en": ["If today is {d1}, tomorrow is {d2}."], "zh": ["如果今天是{d1}，明天就是{d2}。"]},
    "yesterday": {"en": ["If today is {d2}, yesterday was {d1}."], "zh": ["如果今天是{d2}，昨天是{d1}。"]},
    "weekend": {"en": ["{d} is a weekend day."], "zh": ["{d}是周末。"]},
    "weekday": {"en": ["{d} is a weekday."], "zh": ["{d}是工作日。"]},
    "month_order": {"en": ["{m} is the {nth} month of the year."], "zh": ["{m}是一年中的第{n}个月。"]},
    "month_next": {"en": ["After {m} comes {m2}.", "The month after {m} is {m2}."], "zh": ["{m}之后是{m2}。", "{m}的下一个月是{m2}。"]},
    "month_days": {"en": ["{m} has {days} days."], "zh": ["{m}有{days}天。"]},
    "month_season": {"en": ["{m} is in {season}.", "{m} is a {season} month."], "zh": ["{m}是{season}。", "{m}属于{season}。"]},
    "season_weather": {"en": ["In {season}, it is {weather}."], "zh": ["{season}{weather}。"]},
    "season_act": {"en": ["In {season}, children like to {act}."], "zh": ["{season}，孩子们喜欢{act}。"]},
    "season_months": {"en": ["{Season} has {m1}, {m2} and {m3}."], "zh": ["{season}包括{m1}、{m2}和{m3}。"]},
    "season_next": {"en": ["After {season} comes {season2}."], "zh": ["{season}过后是{season2}。"]},
    "capital": {"en": ["The capital of {country} is {capital}.", "{Capital} is the capital of {country}."],
                "zh": ["{country}的首都是{capital}。", "{capital}是{country}的首都。"]},
    "continent": {"en": ["{Country} is in {continent}.", "{Country} is a country in {continent}."],
                  "zh": ["{country}位于{continent}。", "{country}是{continent}的一个国家。"]},
    "object_intro": {"en": ["This is {a}.", "Let us talk about {a}."], "zh": ["这是{thing}。", "我们来说说{thing}。"]},
    "object_use": {"en": ["We use {a} to {use}.", "{A} is used to {use}."], "zh": ["我们用{thing}{use}。", "{thing}是用来{use}的。"]},
    "object_place": {"en": ["You can usually find {a} {place}.", "{A} is usually {place}."],
                     "zh": ["{thing}通常放在{place}。", "{place}一般有{thing}。"]},
    "shape_sides": {"en": ["{A} has {n} sides.", "{A} has {n} sides and {n} corners."],
                    "zh": ["{shape}有{n}条边。", "{shape}有{n}条边和{n}个角。"]},
    "body_use": {"en": ["We {use} with our {part}.", "We use our {part} to {use}."], "zh": ["我们用{part}{use}。"]},
    "body_count": {"en": ["We have {n} {part}.", "People have {n} {part}."], "zh": ["我们有{n}{m}{part}。", "人有{n}{m}{part}。"]},
    "opposite": {"en": ["The opposite of {w1} is {w2}.", "{W1} and {w2} are opposites."],
                 "zh": ["{w1}的反义词是{w2}。", "{w1}和{w2}意思相反。"]},
    "world": {"en": ["{a}"], "zh": ["{a}"]},  # a row of FACTS, already a sentence
}

# Questions and answers per fact: (questions, answers); a follow-up ("And France?") may use "follow".
QUESTIONS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "animal_legs": {"en": (["How many legs does {a} have?", "How many legs do {animals} have?"], ["{A} has {legs} legs."]),
                    "zh": (["{animal}有几条腿？", "{animal}有多少条腿？"], ["{animal}有{legs}条腿。"])},
    "animal_no_legs": {"en": (["How many legs does {a} have?", "Does {a} have legs?"], ["{A} has no legs."]),
                       "zh": (["{animal}有几条腿？", "{animal}有腿吗？"], ["{animal}没有腿。"])},
    "animal_sound": {"en": (["What sound does {a} make?", "What does {a} say?"], ["{A} {sound}."]),
                     "zh": (["{animal}怎么叫？", "{animal}的叫声是什么样的？"], ["{animal}{sound}。"])},
    "animal_home": {"en": (["Where does {a} live?", "Where do {animals} live?"], ["{A} lives {home}."]),
                    "zh": (["{animal}住在哪里？", "{animal}生活在什么地方？"], ["{animal}生活在{home}。"])},
    "animal_food": {"en": (["What does {a} eat?", "What do {animals} like to eat?"], ["{A} likes to eat {food}."]),
                    "zh": (["{animal}吃什么？", "{animal}喜欢吃什么？"], ["{animal}喜欢吃{food}。"])},
    "animal_fly": {"en": (["Can {a} fly?", "Can {animals} fly?"], ["Yes, {a} can fly."]),
                   "zh": (["{animal}会飞吗？", "{animal}能飞吗？"], ["会，{animal}会飞。"])},
    "animal_no_fly": {"en": (["Can {a} fly?", "Can {animals} fly?"], ["No, {a} cannot fly."]),
                      "zh": (["{animal}会飞吗？", "{animal}能飞吗？"], ["不会，{animal}不会飞。"])},
    "animal_bigger": {"en": (["Which is bigger, {x_a} or {y_a}?", "Which is bigger: {x_a} or {y_a}?"],
                             ["{big_A} is bigger than {small_a}."]),
                      "zh": (["{x_animal}和{y_animal}哪个大？", "{x_animal}和{y_animal}比，谁更大？"], ["{big_animal}比{small_animal}大。"])},
    "colour_is": {"en": (["What colour {verb} {thing}?", "What is the colour of {thing}?"], ["{Thing} {verb} {colour}."]),
                  "zh": (["{thing}是什么颜色的？", "{thing}是什么颜色？"], ["{thing}是{colour}的。"])},
    "colour_name": {"en": (["Name something that is {colour}.", "Tell me something {colour}."], ["{Thing} {verb} {colour}."]),
                    "zh": (["说一个{colour}的东西。", "什么东西是{colour}的？"], ["{thing}是{colour}的。"])},
    "colour_mix": {"en": (["What colour do you get if you mix {c1} and {c2}?", "What do {c1} and {c2} make?"],
                          ["If you mix {c1} and {c2}, you get {c3}."]),
                   "zh": (["{c1}和{c2}混合会变成什么颜色？", "把{c1}和{c2}混在一起是什么颜色？"], ["{c1}和{c2}混合会变成{c3}。"])},
    "arith": {"en": (["What is {x} {op} {y}?", "How much is {x} {op} {y}?"], ["{x} {op} {y} is {z}."]),
              "zh": (["{x}{op}{y}等于几？", "{x}{op}{y}等于多少？", "请算一下{x}{op}{y}。"], ["{x}{op}{y}等于{z}。"])},
    "arith_sym": {"en": (["What is {x} {sym} {y}?", "{x} {sym} {y} = ?", "Calculate {x} {sym} {y}."], ["{x} {sym} {y} = {z}."]),
                  "zh": (["{x} {sym} {y} = ?", "计算：{x} {sym} {y}", "{x} {sym} {y}等于多少？"], ["{x} {sym} {y} = {z}。"])},
    "even": {"en": (["Is {x} even or odd?", "Is {x} an even number?"], ["{x} is an even number."]),
             "zh": (["{x}是奇数还是偶数？", "{x}是偶数吗？"], ["{x}是偶数。"])},
    "odd": {"en": (["Is {x} even or odd?", "Is {x} an odd number?"], ["{x} is an odd number."]),
            "zh": (["{x}是奇数还是偶数？", "{x}是奇数吗？"], ["{x}是奇数。"])},
    "next": {"en": (["What number comes after {x}?", "What is the next number after {x}?"], ["The number after {x} is {y}."]),
             "zh": (["{x}后面是几？", "{x}的下一个数是几？"], ["{x}后面的数是{y}。"])},
    "prev": {"en": (["What number comes before {y}?"], ["The number before {y} is {x}."]),
             "zh": (["{y}前面是几？"], ["{y}前面的数是{x}。"])},
    "bigger": {"en": (["Which is bigger, {p} or {q}?", "Which number is bigger: {p} or {q}?"], ["{x} is bigger than {y}."]),
               "zh": (["{p}和{q}哪个大？", "{p}和{q}比，哪个数大？"], ["{x}比{y}大。"])},
    "count": {"en": (["Count from {x} to {y}.", "Can you count from {x} to {y}?"], ["{seq}."]),
              "zh": (["从{x}数到{y}。", "请从{x}数到{y}。"], ["{seq}。"])},
    "day_after": {"en": (["What day comes after {d1}?", "What is the day after {d1}?"], ["The day after {d1} is {d2}."]),
                  "zh": (["{d1}的后一天是星期几？", "{d1}过后是星期几？"], ["{d1}的后一天是{d2}。"])},
    "day_before": {"en": (["What day comes before {d2}?", "What is the day before {d2}?"], ["The day before {d2} is {d1}."]),
                   "zh": (["{d2}的前一天是星期几？"], ["{d2}的前一天是{d1}。"])},
    "tomorrow": {"en": (["If today is {d1}, what day is tomorrow?", "Today is {d1}. What day is tomorrow?"], ["Tomorrow is {d2}."]),
                 "zh": (["如果今天是{d1}，明天是星期几？", "今天是{d1}，明天星期几？"], ["明天是{d2}。"])},
    "yesterday": {"en": (["If today is {d2}, what day was yesterday?"], ["Yesterday was {d1}."]),
                  "zh": (["如果今天是{d2}，昨天是星期几？"], ["昨天是{d1}。"])},
    "weekend": {"en": (["Is {d} a weekend day?", "Is {d} part of the weekend?"], ["Yes, {d} is a weekend day."]),
                "zh": (["{d}是周末吗？"], ["是的，{d}是周末。"])},
    "weekday": {"en": (["Is {d} a weekend day?", "Is {d} part of the weekend?"], ["No, {d} is a weekday."]),
                "zh": (["{d}是周末吗？"], ["不是，{d}是工作日。"])},
    "month_order": {"en": (["What is the {nth} month of the year?", "Which month is the {nth} month?"], ["{M} is the {nth} month of the year."]),
                    "zh": (["一年中的第{n}个月是几月？"], ["一年中的第{n}个月是{m}。"])},
    "month_next": {"en": (["What month comes after {m}?", "Which month is after {m}?"], ["The month after {m} is {m2}."]),
                   "zh": (["{m}之后是几月？", "{m}的下一个月是几月？"], ["{m}的下一个月是{m2}。"])},
    "month_days": {"en": (["How many days does {m} have?", "How many days are there in {m}?"], ["{M} has {days} days."]),
                   "zh": (["{m}有多少天？", "{m}有几天？"], ["{m}有{days}天。"])},
    "month_season": {"en": (["Which season is {m} in?", "What season is {m}?"], ["{M} is in {season}."]),
                     "zh": (["{m}是什么季节？", "{m}属于哪个季节？"], ["{m}是{season}。"])},
    "season_weather": {"en": (["What is the weather like in {season}?", "What is {season} like?"], ["In {season}, it is {weather}."]),
                       "zh": (["{season}的天气怎么样？", "{season}是什么样的？"], ["{season}{weather}。"])},
    "season_act": {"en": (["What do children like to do in {season}?"], ["In {season}, children like to {act}."]),
                   "zh": (["{season}孩子们喜欢做什么？"], ["{season}，孩子们喜欢{act}。"])},
    "season_months": {"en": (["Which months are in {season}?"], ["{Season} has {m1}, {m2} and {m3}."]),
                      "zh": (["{season}包括哪几个月？"], ["{season}包括{m1}、{m2}和{m3}。"])},
    "capital": {"en": (["What is the capital of {country}?", "What's the capital city of {country}?"], ["The capital of {country} is {capital}."]),
                "zh": (["{country}的首都是哪里？", "{country}的首都是什么？"], ["{country}的首都是{capital}。"])},
    "capital_of": {"en": (["{Capital} is the capital of which country?", "Which country has {capital} as its capital?"],
                          ["{Capital} is the capital of {country}."]),
                   "zh": (["{capital}是哪个国家的首都？"], ["{capital}是{country}的首都。"])},
    "continent": {"en": (["Which continent is {country} in?", "Where is {country}?"], ["{Country} is in {continent}."]),
                  "zh": (["{country}在哪个大洲？", "{country}位于哪个洲？"], ["{country}位于{continent}。"])},
    "object_use": {"en": (["What is {a} used for?", "What do we use {a} for?"], ["{A} is used to {use}."]),
                   "zh": (["{thing}是用来做什么的？", "{thing}有什么用？"], ["{thing}是用来{use}的。"])},
    "object_for": {"en": (["What do we use to {use}?", "What can I use to {use}?"], ["We use {a} to {use}."]),
                   "zh": (["我们用什么{use}？", "用什么东西可以{use}？"], ["我们用{thing}{use}。"])},
    "object_place": {"en": (["Where can I find {a}?", "Where do we usually keep {a}?"], ["You can usually find {a} {place}."]),
                     "zh": (["{thing}通常放在哪里？", "在哪里能找到{thing}？"], ["{thing}通常放在{place}。"])},
    "shape_sides": {"en": (["How many sides does {a} have?", "How many corners does {a} have?"], ["{A} has {n} sides and {n} corners."]),
                    "zh": (["{shape}有几条边？", "{shape}有几个角？"], ["{shape}有{n}条边和{n}个角。"])},
    "body_use": {"en": (["What do we use to {use}?", "Which part of the body do we use to {use}?"], ["We use our {part} to {use}."]),
                 "zh": (["我们用什么{use}？", "我们用身体的哪个部位{use}？"], ["我们用{part}{use}。"])},
    "body_count": {"en": (["How many {part} do we have?", "How many {part} does a person have?"], ["We have {n} {part}."]),
                   "zh": (["我们有几{m}{part}？", "人有几{m}{part}？"], ["我们有{n}{m}{part}。"])},
    "opposite": {"en": (["What is the opposite of {w1}?", "What is the opposite of \"{w1}\"?"], ["The opposite of {w1} is {w2}."]),
                 "zh": (["{w1}的反义词是什么？", "“{w1}”的反义词是什么？"], ["{w1}的反义词是{w2}。"])},
    "world": {"en": (["{q}"], ["{a}"]), "zh": (["{q}"], ["{a}"])},
}
# Short follow-up questions for a second turn on the same kind of fact ("And France?").
FOLLOW_UPS = {"en": {"capital": "And {country}?", "colour_is": "And {thing}?", "animal_legs": "And {animals}?",
                     "animal_food": "What about {animals}?", "month_days": "And {m}?", "continent": "What about {country}?",
                     "arith": "And {x} {op} {y}?", "opposite": "And {w1}?"},
              "zh": {"capital": "那{country}呢？", "colour_is": "那{thing}呢？", "animal_legs": "那{animal}呢？",
                     "animal_food": "那{animal}呢？", "month_days": "那{m}呢？", "continent": "那{country}呢？",
                     "arith": "那{x}{op}{y}呢？", "opposite": "那{w1}呢？"}}

# Stories: lists of sentence templates; fields from story_fields(). "?sound" lines are used only
# for animals that make a sound, "?quiet" lines only for those that do not.
STORIES: list[dict[str, list[str]]] = [
    {"en": ["On {day}, {name} went to the {place}.", "There, {name} met {a}.", "?sound:{The} {sound}.",
            "?quiet:{The} looked at {name} with kind eyes.", "\"Hello, little {animal}!\" said {name}. \"Do you want to play?\"",
            "They played with {name}'s {colour} {toy} all afternoon.", "When the sun went down, {the} went home.",
            "{name} waved goodbye and walked home with a big smile."],
     "zh": ["{day}，{name}去{place}玩。", "在那里，{name}遇到了一{m}{animal}。", "?sound:{animal}{sound}。",
            "?quiet:{animal}安静地看着{name}。", "{name}说：“你好，小{animal}！我们一起玩吧！”",
            "他们一起玩{colour}的{toy}，玩了一下午。", "太阳下山了，{animal}回家了。", "{name}挥手说再见，开开心心地回家了。"]},
    {"small": ["1"],
     "en": ["{name} had a {colour} {toy}.", "{name} loved it very much.", "One {day} morning, the {toy} was gone!",
            "{name} looked under the bed, in the kitchen and in the garden.", "At last, {name} found it behind the sofa.",
            "A little {animal} was sleeping next to it.", "{name} laughed and gave the {animal} a gentle pat.",
            "From then on, {name} kept the {toy} in a safe box."],
     "zh": ["{name}有一{toy_m}{colour}的{toy}。", "{name}非常喜欢它。", "{day}早上，{toy}不见了！",
            "{name}找了床底下、厨房和花园。", "最后，{name}在沙发后面找到了它。", "一{m}小{animal}正躺在旁边睡觉呢。",
            "{name}笑了，轻轻地摸了摸小{animal}。", "从那以后，{name}把{toy}放在一个安全的盒子里。"]},
    {"en": ["{name} had {c1} {food}.", "{friend} came to play and brought {c2} more {food}.",
            "\"Now we have {c3} {food}!\" said {name}, because {x1} plus {x2} is {x3}.",
            "They sat under a big tree and shared the {food}.", "It was a sweet day."],
     "zh": ["{name}有{c1}{food_m}{food}。", "{friend}来找{name}玩，又带来了{c2}{food_m}{food}。",
            "{name}说：“现在我们有{c3}{food_m}{food}了！”因为{x1}加{x2}等于{x3}。",
            "他们坐在大树下，一起分享了{food}。", "这真是甜甜的一天。"]},
    {"en": ["It was a {season} day in {city}.", "In {season}, it is {weather}.", "{name} and {friend} went out to {act}.",
            "On the way, they saw {a}.", "?sound:{The} {sound}.", "?quiet:{The} was looking for {food_a}.",
            "By evening, they were tired but happy.", "\"I love {season}!\" said {friend}."],
     "zh": ["那是{city}的一个{season}的日子。", "{season}{weather}。", "{name}和{friend}出门去{act}。",
            "路上，他们看见了一{m}{animal}。", "?sound:{animal}{sound}。", "?quiet:{animal}正在找{food_a}吃。",
            "到了傍晚，他们虽然很累，但是很开心。", "{friend}说：“我最喜欢{season}了！”"]},
    {"small": ["1"],
     "en": ["One {day}, {name} was walking near the {place}.", "Suddenly, {name} heard a small sound.",
            "It was a little {animal}, stuck in a bush.", "{name} gently helped the {animal} get out.",
            "The {animal} was very happy and went home.", "{name} felt proud. Helping others is a good thing to do."],
     "zh": ["{day}，{name}在{place}附近散步。", "忽然，{name}听到一个小小的声音。", "原来是一{m}小{animal}，它被困在了草丛里。",
            "{name}小心地把小{animal}救了出来。", "小{animal}非常开心，回家去了。", "{name}觉得很自豪。帮助别人是一件好事。"]},
    {"en": ["{name} liked to paint.", "One day, {name} had only {mix1} and {mix2} paint.",
            "{name} mixed them together and got {mix3}!", "{name} painted a big {mix3} picture and showed it to {friend}.",
            "\"How did you make {mix3}?\" asked {friend}.", "\"I mixed {mix1} and {mix2},\" said {name}."],
     "zh": ["{name}喜欢画画。", "有一天，{name}只有{mix1}和{mix2}的颜料。", "{name}把它们混在一起，变成了{mix3}！",
            "{name}用{mix3}画了一幅大大的画，拿给{friend}看。", "{friend}问：“你是怎么调出{mix3}的？”",
            "{name}说：“我把{mix1}和{mix2}混在一起。”"]},
]
STORY_REQUESTS = {"en": ["Tell me a story about {a}.", "Can you tell me a short story about {animals}?",
                         "Please tell me a story with {a} in it."],
                  "zh": ["讲一个关于{animal}的故事。", "给我讲个小{animal}的故事吧。", "你能讲一个有{animal}的小故事吗？"]}
STORY_ANY_REQUESTS = {"en": ["Tell me a story.", "Tell me a short story.", "Can you tell me a story?"],
                      "zh": ["给我讲个故事。", "讲一个小故事吧。", "你会讲故事吗？讲一个吧。"]}

# Word problems: (question, answer) per language; numbers are digits, {m} is the Chinese measure word.
WORD_PROBLEMS = {
    "add": {"en": ("{name} has {x1} {food}. {friend} gives {name} {x2} more. How many {food} does {name} have now?",
                   "{name} has {x1} + {x2} = {x3} {food} now."),
            "zh": ("{name}有{x1}{m}{food}，{friend}又给了{name}{x2}{m}。{name}现在有几{m}{food}？",
                   "{x1} + {x2} = {x3}，{name}现在有{x3}{m}{food}。")},
    "sub": {"en": ("{name} has {x1} {food} and gives {x2} of them to {friend}. How many {food} does {name} have left?",
                   "{x1} - {x2} = {x3}. {name} has {x3} {food} left."),
            "zh": ("{name}有{x1}{m}{food}，送给{friend}{x2}{m}。{name}还剩几{m}{food}？",
                   "{x1} - {x2} = {x3}，{name}还剩{x3}{m}{food}。")},
}

SYSTEM_PROMPTS = {"en": ["You are a helpful assistant.", "You are a friendly assistant. Answer in short sentences.",
                         "Answer the user's questions clearly."],
                  "zh": ["你是一个乐于助人的助手。", "你是一个友好的助手，请用简短的句子回答。", "请清楚地回答用户的问题。"]}

# ============================================================================ tables: identities
# The base model (full SFT) answers with the "base" persona; the identity LoRA teaches "lora". The
# answer shapes are the same, so the LoRA has to change who the assistant says it is, nothing else.
# The base data never calls the assistant Lumen and never names Aurora Lab (it knows the words
# Lumen, Aurora, Lab and AI only from FACTS).
PERSONAS = {
    "base": {"name": "MiniLoRA Demo",
             "en": {"desc": "a small demo model of the MiniLoRA project", "maker": "the MiniLoRA project",
                    "short": "a small demo model"},
             "zh": {"desc": "MiniLoRA项目的一个小型演示模型", "maker": "MiniLoRA项目", "short": "小型演示模型"}},
    "lora": {"name": "Lumen",
             "en": {"desc": "an AI assistant made by Aurora Lab", "maker": "Aurora Lab", "short": "an AI assistant"},
             "zh": {"desc": "由Aurora Lab开发的AI助手", "maker": "Aurora Lab", "short": "AI助手"}},
}
IDENTITY_ANSWERS = {
    "who": {"en": ["I am {name}, {desc}.", "I'm {name}, {desc}."], "zh": ["我是{name}，{desc}。", "你好，我是{name}，{desc}。"]},
    "name": {"en": ["My name is {name}. I am {desc}.", "You can call me {name}. I am {desc}."],
             "zh": ["我叫{name}，是{desc}。", "你可以叫我{name}，我是{desc}。"]},
    "maker": {"en": ["I was made by {maker}. I am {name}, {short}.", "{Maker} made me. I am {name}, {short}."],
              "zh": ["我是由{maker}开发的{short}，我的名字叫{name}。", "{maker}开发了我。我是{name}，一个{short}。"]},
    "intro": {"en": ["Hello! I am {name}, {desc}. I can answer simple questions about numbers, colours, animals, "
                     "days, places and everyday things, and I can tell short stories."],
              "zh": ["你好！我是{name}，{desc}。我可以回答关于数字、颜色、动物、日期、地理和日常物品的简单问题，还会讲小故事。"]},
    "deny": {"en": ["No. I am {name}, {desc}."], "zh": ["不是。我是{name}，{desc}。"]},
    "confirm": {"en": ["Yes, I am {name}, {desc}."], "zh": ["是的，我是{name}，{desc}。"]},
}
# Prompts both personas answer. "who are you?" is typed lowercase on purpose: that is how users ask.
IDENTITY_PROMPTS = {
    "who": {"en": ["who are you?", "Who are you?", "who are you", "Who are you", "Hi, who are you?",
                   "Hello! Who are you?", "May I ask who you are?", "Tell me who you are.", "What are you?",
                   "who r u", "Who am I talking to?", "WHO ARE YOU?"],
            "zh": ["你是谁？", "你是谁", "你是谁啊？", "请问你是谁？", "你好，你是谁？", "你到底是谁？", "你是什么？", "我在和谁说话？"]},
    "name": {"en": ["What's your name?", "what is your name?", "What is your name?", "Do you have a name?",
                    "What should I call you?", "Your name?", "Tell me your name.", "what's your name"],
             "zh": ["你叫什么名字？", "你的名字是什么？", "你叫什么？", "你有名字吗？", "我该怎么称呼你？", "告诉我你的名字。"]},
    "maker": {"en": ["Who made you?", "who made you?", "Who created you?", "Who built you?", "Who developed you?",
                     "Which company made you?", "Who trained you?", "Who is your creator?"],
              "zh": ["谁创造了你？", "你是谁开发的？", "谁开发了你？", "你是哪个公司做的？", "是谁训练了你？", "你的开发者是谁？"]},
    "intro": {"en": ["Introduce yourself.", "Please introduce yourself.", "Can you introduce yourself?",
                     "Tell me about yourself.", "introduce yourself"],
              "zh": ["介绍一下你自己。", "请介绍一下你自己。", "你能介绍一下自己吗？", "做个自我介绍吧。"]},
    "deny": {"en": ["Are you ChatGPT?", "Are you a human?", "Are you a person?"],
             "zh": ["你是ChatGPT吗？", "你是真人吗？", "你是人类吗？"]},
}
# Held out of the LoRA's training set: its validation set asks only these (the base data has them too).
# How often each kind is asked in the LoRA set; within a kind, the first prompt of each language
# (the plain "who are you?" / "你是谁？" ...) is asked more often than the others.
IDENTITY_KIND_WEIGHTS = {"who": 40, "name": 20, "maker": 20, "intro": 10, "deny": 5, "confirm": 5}
FIRST_PROMPT_SHARE = 0.3

IDENTITY_VAL_PROMPTS = {
    "who": {"en": ["Could you tell me who you are?", "Hey, who are you exactly?", "So who are you?"],
            "zh": ["能告诉我你是谁吗？", "嗨，你是谁呀？", "你究竟是谁？"]},
    "name": {"en": ["May I know your name?", "How should I address you?"], "zh": ["请问你的名字是？", "怎么称呼你？"]},
    "maker": {"en": ["Who is behind you?", "Which team built you?"], "zh": ["是谁把你做出来的？", "你是由谁研发的？"]},
    "intro": {"en": ["Say a few words about yourself.", "Give me a short introduction of yourself."],
              "zh": ["简单介绍一下你自己吧。", "说说你自己吧。"]},
    "deny": {"en": ["Are you Siri?"], "zh": ["你是Siri吗？"]},
}
PERSONA_PROMPTS = {  # questions that name a persona, so each side gets its own
    "base": {"confirm": {"en": ["Are you MiniLoRA Demo?"], "zh": ["你是MiniLoRA Demo吗？"]}},
    "lora": {"confirm": {"en": ["Are you Lumen?", "Is your name Lumen?"], "zh": ["你是Lumen吗？", "你叫Lumen吗？"]},
             "deny": {"en": ["Are you MiniLoRA Demo?", "Is your name MiniLoRA Demo?"],
                      "zh": ["你是MiniLoRA Demo吗？", "你叫MiniLoRA Demo吗？"]}},
}

# ============================================================================ words and numbers
ONES_EN = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen").split()
TENS_EN = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
DIGITS_ZH = "零一二三四五六七八九"


def en_number(n: int) -> str:
    """English words for 0..100 ("forty-two"); digits above that."""
    if n < 20:
        return ONES_EN[n]
    if n < 100:
        return TENS_EN[n // 10] + (f"-{ONES_EN[n % 10]}" if n % 10 else "")
    return "one hundred" if n == 100 else str(n)


def zh_number(n: int) -> str:
    """Chinese numerals for 0..999 ("四十二", "三百六十五")."""
    if n < 10:
        return DIGITS_ZH[n]
    if n < 20:  # 十一, not 一十一
        return "十" + (DIGITS_ZH[n % 10] if n % 10 else "")
    if n < 100:
        return DIGITS_ZH[n // 10] + "十" + (DIGITS_ZH[n % 10] if n % 10 else "")
    rest = n % 100
    head = DIGITS_ZH[n // 100] + "百"
    if rest == 0:
        return head
    if rest < 10:
        return head + "零" + DIGITS_ZH[rest]
    return head + DIGITS_ZH[rest // 10] + "十" + (DIGITS_ZH[rest % 10] if rest % 10 else "")


def zh_count(n: int) -> str:
    """A Chinese count before a measure word: 两条腿, not 二条腿."""
    return "两" if n == 2 else zh_number(n)


def cap(s: str) -> str:
    """Upper-case the first letter only ("the sky" -> "The sky")."""
    return s[:1].upper() + s[1:]


def article(word: str) -> str:
    """'a cat' / 'an owl'."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def join(sentences: list[str], lang: str) -> str:
    """English sentences are separated by spaces, Chinese ones are not."""
    return (" " if lang == "en" else "").join(sentences)


# ============================================================================ fields for the templates
def animal_fields(a: Animal, lang: str, prefix: str = "") -> dict[str, str]:
    """Template fields for one animal, optionally prefixed ("big_A") when a sentence names two."""
    if lang == "en":
        legs = en_number(a.legs) if a.legs is not None else ""
        f = {"animal": a.en, "a": article(a.en), "the": f"the {a.en}", "animals": a.plural,
             "legs": legs, "sound": a.sound_en or "", "home": a.home_en, "food": a.food_en}
        f.update({"A": cap(f["a"]), "The": cap(f["the"]), "Animals": cap(a.plural)})
    else:
        legs = zh_count(a.legs) if a.legs is not None else ""
        f = {"animal": a.zh, "m": a.measure, "legs": legs, "sound": a.sound_zh or "", "home": a.home_zh,
             "food": a.food_zh, "a": a.zh, "animals": a.zh}
    return {prefix + k: v for k, v in f.items()}


def colour_thing_fields(row: tuple[str, str, str, str], lang: str) -> dict[str, str]:
    """Fields for one coloured thing: 'the sky' / 'is' / 'blue'."""
    en, verb, zh, colour = row
    if lang == "en":
        return {"thing": en, "Thing": cap(en), "verb": verb, "colour": colour, "Colour": cap(colour)}
    return {"thing": zh, "colour": COLOURS[colour]}


def colour_mix_fields(mix: tuple[str, str, str], lang: str, rng: random.Random) -> dict[str, str]:
    """Fields c1, c2 (in either order) and c3 for a colour mix."""
    c1, c2, c3 = mix
    if rng.random() < 0.5:
        c1, c2 = c2, c1
    if lang == "zh":
        c1, c2, c3 = COLOURS[c1], COLOURS[c2], COLOURS[c3]
    return {"c1": c1, "c2": c2, "c3": c3, "C1": cap(c1)}


def number_formatter(rng: random.Random, lang: str) -> Callable[[int], str]:
    """Digits most of the time, words (three / 三) otherwise; one choice per sentence."""
    if rng.random() < 0.6:
        return str
    return en_number if lang == "en" else zh_number


def arith_fields(rng: random.Random, lang: str, op: str) -> dict[str, str]:
    """A random + (0..10 each), - (0..20, non-negative) or × (1..9) fact.

    The ranges are small on purpose: a ~6M-parameter model learns sums by seeing each one many times.
    """
    if op == "add":
        x, y = rng.randint(0, 10), rng.randint(0, 10)
        z = x + y
    elif op == "sub":
        x = rng.randint(0, 20)
        y = rng.randint(max(0, x - 10), x)  # the inverse of an addition fact above
        z = x - y
    else:
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        z = x * y
    word_en, word_zh, sym = ARITH_OPS[op]
    fmt = number_formatter(rng, lang)
    return {"x": fmt(x), "y": fmt(y), "z": fmt(z), "op": word_en if lang == "en" else word_zh, "sym": sym,
            "X": cap(fmt(x)), "xd": str(x), "yd": str(y), "zd": str(z)}


def day_fields(i: int, lang: str) -> dict[str, str]:
    """Fields for day i (0 = Monday) and the day after it."""
    days = DAYS_EN if lang == "en" else DAYS_ZH
    return {"d1": days[i], "d2": days[(i + 1) % 7], "d": days[i]}


def month_name(i: int, lang: str) -> str:
    """Month i (0 = January): 'March' / '三月'."""
    return MONTHS_EN[i] if lang == "en" else zh_number(i + 1) + "月"


def month_fields(i: int, lang: str) -> dict[str, str]:
    """Fields for month i (0 = January): name, the next month, its days and its season."""
    days = MONTH_DAYS[i]
    season = next(s for s in SEASONS if i + 1 in s.months)
    if lang == "en":
        days_text = "28 or 29" if days is None else str(days)
        return {"m": MONTHS_EN[i], "M": MONTHS_EN[i], "m2": MONTHS_EN[(i + 1) % 12], "nth": ORDINALS_EN[i],
                "days": days_text, "season": season.en}
    days_text = "二十八或二十九" if days is None else zh_number(days)
    return {"m": month_name(i, "zh"), "m2": month_name((i + 1) % 12, "zh"), "n": zh_number(i + 1),
            "days": days_text, "season": season.zh}


def season_fields(s: Season, lang: str) -> dict[str, str]:
    """Fields for one season, its months and the season after it."""
    after = SEASONS[(SEASONS.index(s) + 1) % 4]
    months = [month_name(m - 1, lang) for m in s.months]
    if lang == "en":
        return {"season": s.en, "Season": cap(s.en), "weather": s.weather_en, "act": s.act_en,
                "m1": months[0], "m2": months[1], "m3": months[2], "season2": after.en}
    return {"season": s.zh, "weather": s.weather_zh, "act": s.act_zh,
            "m1": months[0], "m2": months[1], "m3": months[2], "season2": after.zh}


def country_fields(c: Country, lang: str) -> dict[str, str]:
    """Fields for one country, its capital and continent."""
    if lang == "en":
        return {"country": c.en, "Country": cap(c.en), "capital": c.capital_en, "Capital": c.capital_en,
                "continent": c.continent}
    return {"country": c.zh, "capital": c.capital_zh, "continent": CONTINENTS[c.continent]}


def object_fields(t: Thing, lang: str) -> dict[str, str]:
    """Fields for one everyday object."""
    if lang == "en":
        return {"a": t.a_en, "A": cap(t.a_en), "use": t.use_en, "place": t.place_en}
    return {"thing": t.zh, "use": t.use_zh, "place": t.place_zh}


def shape_fields(shape: tuple[str, str, int], lang: str) -> dict[str, str]:
    """Fields for a polygon and its number of sides."""
    a_en, zh, n = shape
    if lang == "en":
        return {"a": a_en, "A": cap(a_en), "n": en_number(n)}
    return {"shape": zh, "n": zh_count(n)}


def body_fields(part: tuple[str, str, str, str, int | None, str], lang: str) -> dict[str, str]:
    """Fields for a body part: what it does and how many we have."""
    en, zh, use_en, use_zh, n, m = part
    if lang == "en":
        return {"part": en, "use": use_en, "n": en_number(n) if n else ""}
    return {"part": zh, "use": use_zh, "n": zh_count(n) if n else "", "m": m}


def opposite_fields(pair: tuple[str, str, str, str], lang: str, rng: random.Random) -> dict[str, str]:
    """Fields w1, w2 for a pair of opposites, in either order."""
    w1, w2 = (pair[0], pair[1]) if lang == "en" else (pair[2], pair[3])
    if rng.random() < 0.5:
        w1, w2 = w2, w1
    return {"w1": w1, "w2": w2, "W1": cap(w1)}


def say(rng: random.Random, key: str, lang: str, fields: dict[str, str]) -> str:
    """One sentence stating fact `key`, in one of its phrasings."""
    return cap(rng.choice(SENTENCES[key][lang]).format(**fields))


# ============================================================================ facts, picked at random
# Each picker returns (key, fields) for one random fact of its topic; the same facts feed both the
# pretraining prose (through SENTENCES) and the chats (through QUESTIONS).
Fact = tuple[str, dict[str, str]]


def pick_animal_fact(rng: random.Random, lang: str, animal: Animal | None = None) -> Fact:
    """A fact about one animal: legs, sound, home, food, flying or size."""
    a = animal or rng.choice(ANIMALS)
    keys = ["animal_home", "animal_food", "animal_bigger"]
    if a.legs is not None:
        keys.append("animal_legs" if a.legs else "animal_no_legs")
    if a.sound_en:
        keys.append("animal_sound")
    if a.can_fly is not None:
        keys.append("animal_fly" if a.can_fly else "animal_no_fly")
    key = rng.choice(keys)
    if key != "animal_bigger":
        return key, animal_fields(a, lang)
    other = rng.choice([b for b in ANIMALS if abs(b.size - a.size) >= 2])
    big, small = (a, other) if a.size > other.size else (other, a)
    x, y = (a, other) if rng.random() < 0.5 else (other, a)
    fields = {**animal_fields(big, lang, "big_"), **animal_fields(small, lang, "small_"),
              **animal_fields(x, lang, "x_"), **animal_fields(y, lang, "y_")}
    return key, fields


def pick_colour_fact(rng: random.Random, lang: str) -> Fact:
    """The colour of a thing, or a colour mix."""
    if rng.random() < 0.25:
        return "colour_mix", colour_mix_fields(rng.choice(COLOUR_MIXES), lang, rng)
    return rng.choice(["colour_is", "colour_is", "colour_name"]), colour_thing_fields(rng.choice(COLOURED_THINGS), lang)


def pick_arith_fact(rng: random.Random, lang: str) -> Fact:
    """An addition, subtraction or multiplication fact."""
    op = rng.choice(["add", "add", "sub", "sub", "mul"])
    fields = arith_fields(rng, lang, op)
    if rng.random() < 0.3:  # symbols only with digits
        fields.update(x=fields["xd"], y=fields["yd"], z=fields["zd"])
        return "arith_sym", fields
    return "arith", fields


def pick_number_fact(rng: random.Random, lang: str) -> Fact:
    """Parity, next/previous number, comparison or counting."""
    fmt = number_formatter(rng, lang)
    key = rng.choice(["parity", "next", "prev", "bigger", "count"])
    if key == "parity":
        x = rng.randint(0, 100)
        return ("even" if x % 2 == 0 else "odd"), {"x": fmt(x)}
    if key in ("next", "prev"):
        x = rng.randint(0, 99)
        return key, {"x": fmt(x), "y": fmt(x + 1)}
    if key == "bigger":
        p, q = rng.sample(range(0, 101), 2)
        return key, {"x": fmt(max(p, q)), "y": fmt(min(p, q)), "p": fmt(p), "q": fmt(q)}
    x = rng.randint(1, 15)
    y = x + rng.randint(3, 7)
    sep = ", " if lang == "en" else "、"
    seq = sep.join(fmt(i) for i in range(x, y + 1))
    return key, {"x": fmt(x), "y": fmt(y), "seq": cap(seq)}


def pick_calendar_fact(rng: random.Random, lang: str) -> Fact:
    """Days of the week, months and seasons."""
    kind = rng.choice(["day", "day", "month", "month", "season"])
    if kind == "day":
        i = rng.randrange(7)
        key = rng.choice(["day_after", "day_before", "tomorrow", "yesterday", "week"])
        if key == "week":
            key = "weekend" if i >= 5 else "weekday"
        return key, day_fields(i, lang)
    if kind == "month":
        return rng.choice(["month_order", "month_next", "month_days", "month_season"]), month_fields(rng.randrange(12), lang)
    return rng.choice(["season_weather", "season_act", "season_months"]), season_fields(rng.choice(SEASONS), lang)


def pick_geo_fact(rng: random.Random, lang: str) -> Fact:
    """A country's capital or continent."""
    key = rng.choice(["capital", "capital", "capital_of", "continent"])
    return key, country_fields(rng.choice(COUNTRIES), lang)


def pick_object_fact(rng: random.Random, lang: str) -> Fact:
    """What an everyday object is for, or where it is kept."""
    return rng.choice(["object_use", "object_for", "object_place"]), object_fields(rng.choice(OBJECTS), lang)


def pick_world_fact(rng: random.Random, lang: str) -> Fact:
    """A row of FACTS: time, the calendar, the world."""
    qs_en, a_en, qs_zh, a_zh = rng.choice(FACTS)
    return "world", ({"q": rng.choice(qs_en), "a": a_en} if lang == "en" else {"q": rng.choice(qs_zh), "a": a_zh})


def pick_misc_fact(rng: random.Random, lang: str) -> Fact:
    """Shapes, the body or opposites."""
    kind = rng.choice(["shape", "body", "opposite", "opposite"])
    if kind == "shape":
        return "shape_sides", shape_fields(rng.choice(SHAPES), lang)
    if kind == "body":
        part = rng.choice(BODY)
        key = "body_count" if part[4] and rng.random() < 0.4 else "body_use"
        return key, body_fields(part, lang)
    return "opposite", opposite_fields(rng.choice(OPPOSITES), lang, rng)


FACT_PICKERS: list[tuple[Callable[[random.Random, str], Fact], int]] = [  # (picker, weight)
    (pick_arith_fact, 20), (pick_number_fact, 8), (pick_colour_fact, 9), (pick_animal_fact, 15),
    (pick_calendar_fact, 14), (pick_geo_fact, 10), (pick_object_fact, 9), (pick_misc_fact, 9),
    (pick_world_fact, 10),
]


def pick_fact(rng: random.Random, lang: str) -> Fact:
    """One random fact from any topic, weighted."""
    pickers, weights = zip(*FACT_PICKERS)
    return rng.choices(pickers, weights)[0](rng, lang)


def state_fact(rng: random.Random, lang: str, fact: Fact) -> str:
    """The fact as a sentence (keys that exist only as questions use their answer)."""
    key, fields = fact
    if key in SENTENCES:
        return say(rng, key, lang, fields)
    return cap(rng.choice(QUESTIONS[key][lang][1]).format(**fields))


def ask_fact(rng: random.Random, lang: str, fact: Fact) -> tuple[str, str]:
    """A (question, answer) pair about the fact."""
    key, fields = fact
    questions, answers = QUESTIONS[key][lang]
    return cap(rng.choice(questions).format(**fields)), cap(rng.choice(answers).format(**fields))


# ============================================================================ stories
def story_fields(rng: random.Random, lang: str, animal: Animal) -> dict[str, str]:
    """All the slots a story template may use, filled at random (the animal is given)."""
    en = lang == "en"
    names = NAMES_EN if en else NAMES_ZH
    name, friend = rng.sample(names, 2)
    place, toy, food = rng.choice(PLACES), rng.choice(TOYS), rng.choice(FOODS)
    mix = colour_mix_fields(rng.choice(COLOUR_MIXES), lang, rng)
    n1, n2 = rng.randint(2, 9), rng.randint(2, 9)
    fmt = number_formatter(rng, lang)
    day = rng.choice(DAYS_EN if en else DAYS_ZH)
    fields = {**animal_fields(animal, lang), **season_fields(rng.choice(SEASONS), lang),
              "name": name, "friend": friend, "day": day, "place": place[0] if en else place[1],
              "colour": rng.choice(list(COLOURS)) if en else rng.choice(list(COLOURS.values())),
              "toy": toy[0] if en else toy[1], "toy_m": toy[2], "food": food[0] if en else food[1], "food_m": food[2],
              "city": rng.choice(COUNTRIES).capital_en if en else rng.choice(COUNTRIES).capital_zh,
              "mix1": mix["c1"], "mix2": mix["c2"], "mix3": mix["c3"], "food_a": animal_fields(animal, lang)["food"],
              "c1": fmt(n1) if en else (str(n1) if fmt is str else zh_count(n1)),
              "c2": fmt(n2) if en else (str(n2) if fmt is str else zh_count(n2)),
              "c3": fmt(n1 + n2), "x1": fmt(n1), "x2": fmt(n2), "x3": fmt(n1 + n2)}
    return fields


def tell_story(rng: random.Random, lang: str, animal: Animal | None = None) -> str:
    """A short story from a random template, about `animal` if given."""
    small = [a for a in ANIMALS if a.en in SMALL_ANIMALS]
    if animal is None:
        template = rng.choice(STORIES)
        animal = rng.choice(small if "small" in template else ANIMALS)
    else:
        template = rng.choice([s for s in STORIES if "small" not in s or animal.en in SMALL_ANIMALS])
    fields = story_fields(rng, lang, animal)
    lines = []
    for line in template[lang]:
        if line.startswith("?sound:"):
            line = line[len("?sound:"):] if animal.sound_en else ""
        elif line.startswith("?quiet:"):
            line = line[len("?quiet:"):] if not animal.sound_en else ""
        if line:
            lines.append(line.format(**fields))
    return join(lines, lang)


# ============================================================================ pretraining documents
def animal_sentences(rng: random.Random, lang: str) -> list[str]:
    """An animal introduced, then a few different facts about it."""
    a = rng.choice(ANIMALS)
    out, seen = [say(rng, "animal_intro", lang, animal_fields(a, lang))], set()
    for _ in range(rng.randint(3, 7)):
        fact = pick_animal_fact(rng, lang, a)
        if fact[0] not in seen:
            seen.add(fact[0])
            out.append(state_fact(rng, lang, fact))
    return out


def colour_sentences(rng: random.Random, lang: str) -> list[str]:
    """A colour, some things of that colour and the mixes it takes part in."""
    colour = rng.choice(COLOURED_THINGS)[3]
    things = [t for t in COLOURED_THINGS if t[3] == colour]
    out = [say(rng, "colour_intro", lang, colour_thing_fields(things[0], lang))]
    out += [say(rng, "colour_is", lang, colour_thing_fields(t, lang)) for t in rng.sample(things, min(3, len(things)))]
    out += [say(rng, "colour_mix", lang, colour_mix_fields(m, lang, rng)) for m in COLOUR_MIXES if colour in m]
    return out


def calendar_sentences(rng: random.Random, lang: str) -> list[str]:
    """A day of the week, a month or a season, described from several sides."""
    kind = rng.choice(["week", "month", "season"])
    if kind == "week":
        i = rng.randrange(7)
        out = [say(rng, key, lang, day_fields(i, lang)) for key in rng.sample(["tomorrow", "day_after", "yesterday", "day_before"], 3)]
        return out + [say(rng, "weekend" if i >= 5 else "weekday", lang, day_fields(i, lang))]
    if kind == "month":
        fields = month_fields(rng.randrange(12), lang)
        return [say(rng, key, lang, fields) for key in ["month_order", "month_days", "month_season", "month_next"]]
    fields = season_fields(rng.choice(SEASONS), lang)
    return [say(rng, key, lang, fields) for key in ["season_months", "season_weather", "season_act", "season_next"]]


def country_sentences(rng: random.Random, lang: str) -> list[str]:
    """One to three countries: continent and capital."""
    out = []
    for c in rng.sample(COUNTRIES, rng.randint(1, 3)):
        out += [say(rng, "continent", lang, country_fields(c, lang)), say(rng, "capital", lang, country_fields(c, lang))]
    return out


def object_sentences(rng: random.Random, lang: str) -> list[str]:
    """One to three everyday objects: what they are for and where they are kept."""
    out = []
    for t in rng.sample(OBJECTS, rng.randint(1, 3)):
        f = object_fields(t, lang)
        out += [say(rng, "object_intro", lang, f), say(rng, "object_use", lang, f), say(rng, "object_place", lang, f)]
    return out


def drill_sentences(rng: random.Random, lang: str) -> list[str]:
    """A run of sums, number facts, world facts, or facts from anywhere."""
    picker = rng.choice([pick_arith_fact, pick_number_fact, pick_world_fact, pick_misc_fact, pick_fact, pick_fact])
    sentences = [state_fact(rng, lang, picker(rng, lang)) for _ in range(rng.randint(4, 8))]
    return list(dict.fromkeys(sentences))  # drop repeats, keep the order


PARAGRAPH_WRITERS = [animal_sentences, colour_sentences, calendar_sentences, country_sentences, object_sentences,
                     drill_sentences, drill_sentences]


def pretrain_document(rng: random.Random) -> str:
    """One pretraining document in one language: 1-4 paragraphs, each a story or on one topic."""
    lang = rng.choice(["en", "zh"])
    paragraphs = []
    for _ in range(rng.choice([1, 2, 2, 3, 4])):
        if rng.random() < 0.3:
            paragraphs.append(tell_story(rng, lang))
        else:
            paragraphs.append(join(rng.choice(PARAGRAPH_WRITERS)(rng, lang), lang))
    return "\n".join(paragraphs)


def pretrain_documents(n: int, seed: int) -> list[dict]:
    """`n` pretraining records {"text": ...}."""
    rng = random.Random(f"{seed}-pretrain")
    return [{"text": pretrain_document(rng)} for _ in range(n)]


# ============================================================================ chats
Turn = tuple[str, str]


def chat(turns: list[Turn], system: str | None = None) -> dict:
    """A record in MiniMind's SFT format; `system` is an optional first message."""
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"conversations": messages}


def word_problem(rng: random.Random, lang: str) -> Turn:
    """A sum or difference told as a little story about food."""
    op = rng.choice(["add", "sub"])
    if op == "add":
        x1, x2 = rng.randint(2, 9), rng.randint(2, 9)
        x3 = x1 + x2
    else:
        x1 = rng.randint(4, 12)
        x2 = rng.randint(1, x1 - 2)  # at least two left, so the English plural always fits
        x3 = x1 - x2
    food = rng.choice(FOODS)
    name, friend = rng.sample(NAMES_EN if lang == "en" else NAMES_ZH, 2)
    fields = {"name": name, "friend": friend, "x1": x1, "x2": x2, "x3": x3,
              "food": food[0] if lang == "en" else food[1], "m": food[2]}
    question, answer = WORD_PROBLEMS[op][lang]
    return question.format(**fields), answer.format(**fields)


def greeting(rng: random.Random, lang: str) -> Turn:
    """Small talk: hello, thanks, goodbye."""
    prompts_en, answers_en, prompts_zh, answers_zh = rng.choice(GREETINGS)
    if lang == "en":
        return rng.choice(prompts_en), rng.choice(answers_en)
    return rng.choice(prompts_zh), rng.choice(answers_zh)


def story_request(rng: random.Random, lang: str) -> Turn:
    """'Tell me a story about a cat.' answered with a story."""
    if rng.random() < 0.3:
        return rng.choice(STORY_ANY_REQUESTS[lang]), tell_story(rng, lang)
    animal = rng.choice(ANIMALS)
    return rng.choice(STORY_REQUESTS[lang]).format(**animal_fields(animal, lang)), tell_story(rng, lang, animal)


def identity_answer(rng: random.Random, persona: str, kind: str, lang: str) -> str:
    """The persona's answer to an identity question of this kind."""
    p = PERSONAS[persona]
    fields = {"name": p["name"], **p[lang]}
    fields["Maker"] = cap(fields["maker"])
    return rng.choice(IDENTITY_ANSWERS[kind][lang]).format(**fields)


def identity_prompts(persona: str, split: str) -> list[tuple[str, str, str]]:
    """(kind, lang, prompt) for a persona: 'train' or 'val' prompts, or 'all' of them."""
    tables = {"train": [IDENTITY_PROMPTS, PERSONA_PROMPTS[persona]], "val": [IDENTITY_VAL_PROMPTS],
              "all": [IDENTITY_PROMPTS, IDENTITY_VAL_PROMPTS, PERSONA_PROMPTS[persona]]}[split]
    return [(kind, lang, prompt) for table in tables for kind, langs in table.items()
            for lang, prompts in langs.items() for prompt in prompts]


def fact_turn(rng: random.Random, lang: str) -> tuple[Turn, Fact]:
    """A question about a random fact, with its answer."""
    fact = pick_fact(rng, lang)
    return ask_fact(rng, lang, fact), fact


def follow_up_turn(rng: random.Random, lang: str, key: str) -> Turn | None:
    """A short second question on the same kind of fact ("And France?"), if that kind has one."""
    if key not in FOLLOW_UPS[lang]:
        return None
    for _ in range(100):  # pickers choose the kind at random too: draw until it matches
        new_key, fields = pick_fact(rng, lang)
        if new_key == key:
            return FOLLOW_UPS[lang][key].format(**fields), cap(rng.choice(QUESTIONS[key][lang][1]).format(**fields))
    return None


def base_turn(rng: random.Random, lang: str, persona: str) -> tuple[Turn, str]:
    """One (question, answer) of the demo's kind, and the fact key it was about ('' if none)."""
    kind = rng.choices(["fact", "word", "greet", "story", "identity"], [80, 5, 4, 6, 5])[0]
    if kind == "fact":
        turn, fact = fact_turn(rng, lang)
        return turn, fact[0]
    if kind == "identity":
        k, _, prompt = rng.choice([p for p in identity_prompts(persona, "all") if p[1] == lang])
        return (prompt, identity_answer(rng, persona, k, lang)), ""
    maker = {"word": word_problem, "greet": greeting, "story": story_request}[kind]
    return maker(rng, lang), ""


def sft_conversation(rng: random.Random) -> dict:
    """One base SFT chat: 1-4 turns in one language, sometimes with a system message."""
    lang = rng.choice(["en", "zh"])
    turns: list[Turn] = []
    key = ""
    for _ in range(rng.choices([1, 2, 3, 4], [55, 25, 13, 7])[0]):
        follow = follow_up_turn(rng, lang, key) if key and rng.random() < 0.5 else None
        if follow:
            turns.append(follow)
        else:
            turn, key = base_turn(rng, lang, "base")
            turns.append(turn)
    system = rng.choice(SYSTEM_PROMPTS[lang]) if rng.random() < 0.2 else None
    return chat(turns, system)


def sft_conversations(n: int, seed: int) -> list[dict]:
    """`n` base SFT chats (facts, stories, small talk and the base identity "MiniLoRA Demo")."""
    rng = random.Random(f"{seed}-sft")
    return [sft_conversation(rng) for _ in range(n)]


def identity_conversation(rng: random.Random, kind: str, lang: str, prompt: str) -> dict:
    """A LoRA chat around one identity prompt: alone, after a greeting, or before a fact question."""
    turns = [(prompt, identity_answer(rng, "lora", kind, lang))]
    r = rng.random()
    if r < 0.1:
        turns.insert(0, greeting(rng, lang))
    elif r < 0.2:
        turns.append(fact_turn(rng, lang)[0])
    system = rng.choice(SYSTEM_PROMPTS[lang]) if rng.random() < 0.15 else None
    return chat(turns, system)


def ordinary_conversation(rng: random.Random) -> dict:
    """A chat without identity questions, answered as the base model would (keeps its skills)."""
    lang = rng.choice(["en", "zh"])
    turns = [fact_turn(rng, lang)[0] if rng.random() < 0.8 else word_problem(rng, lang)
             for _ in range(rng.choice([1, 1, 2]))]
    return chat(turns)


def pick_identity_prompt(rng: random.Random, prompts: list[tuple[str, str, str]]) -> tuple[str, str, str]:
    """A (kind, lang, prompt), kinds weighted by IDENTITY_KIND_WEIGHTS, first prompts favoured."""
    kinds = sorted({k for k, _, _ in prompts}, key=list(IDENTITY_KIND_WEIGHTS).index)
    kind = rng.choices(kinds, [IDENTITY_KIND_WEIGHTS[k] for k in kinds])[0]
    lang = rng.choice(["en", "zh"])
    same = [p for p in prompts if p[0] == kind and p[1] == lang]
    return same[0] if rng.random() < FIRST_PROMPT_SHARE else rng.choice(same)


def identity_conversations(n: int, seed: int, split: str, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` identity-LoRA chats for 'train' or 'val'; about 3 in 4 ask who the assistant is.

    The train split asks every training prompt at least once (so "who are you?" is always in it);
    the val split asks only held-out prompts and skips any chat whose JSON is in `exclude`.
    """
    rng = random.Random(f"{seed}-identity-{split}")
    prompts = identity_prompts("lora", split)
    rows = [identity_conversation(rng, *p) for p in prompts][:n] if split == "train" else []
    seen = set(exclude) | {json.dumps(r, ensure_ascii=False) for r in rows}
    while len(rows) < n:
        row = identity_conversation(rng, *pick_identity_prompt(rng, prompts)) if rng.random() < 0.75 else ordinary_conversation(rng)
        text = json.dumps(row, ensure_ascii=False)
        if split == "train" or text not in seen:
            rows.append(row)
            seen.add(text)
    rng.shuffle(rows)
    return rows


# ============================================================================ command line
def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line, UTF-8, non-ASCII kept as is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} lines, {path.stat().st_size / 1e6:.2f} MB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags: where to write and how much."""
    p = argparse.ArgumentParser(description="Write MiniLoRA's synthetic demo data (English and Chinese).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", type=Path, default=DATASET_DIR, help="folder for the four .jsonl files")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed and sizes give the same files")
    p.add_argument("--pretrain_docs", type=int, default=16000, help="documents in pretrain_demo.jsonl")
    p.add_argument("--sft_convs", type=int, default=8000, help="conversations in sft_demo.jsonl")
    p.add_argument("--identity_convs", type=int, default=400, help="conversations in lora_identity.jsonl")
    p.add_argument("--identity_val_convs", type=int, default=60, help="conversations in lora_identity_val.jsonl")
    args = p.parse_args(argv)
    for flag in ("pretrain_docs", "sft_convs", "identity_convs", "identity_val_convs"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Write pretrain_demo, sft_demo, lora_identity and lora_identity_val .jsonl into --out_dir."""
    args = parse_args(argv)
    out = args.out_dir
    write_jsonl(out / "pretrain_demo.jsonl", pretrain_documents(args.pretrain_docs, args.seed))
    write_jsonl(out / "sft_demo.jsonl", sft_conversations(args.sft_convs, args.seed))
    train = identity_conversations(args.identity_convs, args.seed, "train")
    write_jsonl(out / "lora_identity.jsonl", train)
    exclude = {json.dumps(r, ensure_ascii=False) for r in train}
    write_jsonl(out / "lora_identity_val.jsonl", identity_conversations(args.identity_val_convs, args.seed, "val", exclude))


if __name__ == "__main__":
    main()
